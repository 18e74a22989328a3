"""Tensor-parallel plans, pipeline splits and the activation wire, in one process.

The layers are checked by simulating tp ranks without communication: a layer built with
no group computes only its own part, so rank pieces concatenated (colwise) or summed
(rowwise) must give the single-process layer's output. The 4-rank behaviour (equivalence
with one process on transformers models) is in tests/test_tp_pp_models.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from disttrain.errors import ConfigError
from disttrain.parallel.mesh import MeshError
from disttrain.parallel.pipeline import wire
from disttrain.parallel.pipeline.split import build_stages, plan_stages
from disttrain.parallel.tensor.parallel import ColumnParallelLinear, RowParallelLinear, TPContext
from disttrain.parallel.tensor.plan import PlanError, apply_tp_plan, resolve_plan
from tests.cases.mp_models import USER_PLAN, UserLM, build

# Not in the unit layer: most of these build transformers models (importing transformers takes seconds).
pytestmark = pytest.mark.timeout(120)


def ctx(size: int = 2, rank: int = 0) -> TPContext:
    return TPContext(group=None, size=size, rank=rank)


def test_plans_come_from_the_model_or_the_family():
    plan, where, strict = resolve_plan(build("llama"), None)
    assert plan["model.layers.*.self_attn.q_proj"] == "colwise" and "_tp_plan" in where and not strict
    plan, where, _ = resolve_plan(build("gpt2"), None)
    assert plan["transformer.h.*.attn.c_attn"] == "colwise_qkv" and "GPT2LMHeadModel" in where
    from disttrain.examples.gpt import GPT

    assert resolve_plan(GPT(70, 2, 2, 16, 8), None)[0]["tok_emb"] == "vocab"
    assert resolve_plan(UserLM(), USER_PLAN) == (USER_PLAN, "parallel.tp.plan", True)
    with pytest.raises(PlanError, match=r"UserLM declares no tensor-parallel plan[\s\S]*HINT"):
        resolve_plan(UserLM(), None)


@pytest.mark.unit
def test_bad_plans_name_the_key_the_glob_and_the_module_type():
    with pytest.raises(PlanError, match=r"parallel.tp.plan: 'blocks.\*.atn.q' matches no module of UserLM"):
        apply_tp_plan(UserLM(), ctx(), {"blocks.*.atn.q": "colwise"})
    with pytest.raises(
        PlanError, match=r"parallel.tp.plan: 'blocks.\*.norm1' -> colwise: 'blocks.0.norm1' is a LayerNorm"
    ):
        apply_tp_plan(UserLM(), ctx(), {"blocks.*.norm1": "colwise"})
    with pytest.raises(PlanError, match=r"'blocks.\*.attn' -> vocab: 'blocks.0.attn' is a UserAttention"):
        apply_tp_plan(UserLM(), ctx(), {"blocks.*.attn": "vocab"})
    with pytest.raises(PlanError, match=r"unknown style 'diagonal'[\s\S]*HINT: known styles"):
        apply_tp_plan(UserLM(), ctx(), {"head": "diagonal"})
    # A head count kept as an attribute that tp does not divide: the error names the attribute.
    with pytest.raises(PlanError, match=r"UserAttention keeps n_heads = 4, which does not divide by tp=3"):
        apply_tp_plan(UserLM(d=36), ctx(3), USER_PLAN)
    assert issubclass(PlanError, ConfigError)  # the CLI turns it into exit 2


def test_plan_splits_layers_adjusts_heads_and_keeps_tied_weights_tied():
    model = apply_tp_plan(UserLM(), ctx(2, 1), USER_PLAN)
    attn = model.blocks[0].attn
    assert attn.n_heads == 2 and isinstance(attn.q, ColumnParallelLinear) and attn.q.weight.shape == (16, 32)
    assert attn.q.weight.tp_slice.pieces == ((0, 16, 16, 32),)
    gpt2 = apply_tp_plan(build("gpt2"), ctx(2, 1), resolve_plan(build("gpt2"), None)[0])
    att = gpt2.transformer.h[0].attn
    assert (att.num_heads, att.split_size) == (2, 16)
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight  # tied weight: one sharded parameter
    assert gpt2.lm_head.weight.shape == (48, 32)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_column_and_row_pieces_add_up_to_the_layer(kind):
    torch.manual_seed(0)
    if kind == "linear":
        fc, proj = nn.Linear(8, 12), nn.Linear(12, 8)
    else:
        from transformers.pytorch_utils import Conv1D

        fc, proj = Conv1D(12, 8), Conv1D(8, 12)
        nn.init.normal_(fc.weight)
        nn.init.normal_(proj.weight)
    x = torch.randn(3, 5, 8)
    want = proj(torch.relu(fc(x)))
    for parts in (1, 3):  # plain colwise, and a fused q/k/v
        cols = [ColumnParallelLinear(fc, ctx(2, r), partitions=parts) for r in range(2)]
        rows = [RowParallelLinear(proj, ctx(2, r)) for r in range(2)]
        if parts == 1:
            got = sum(rows[r].forward(torch.relu(cols[r](x))) for r in range(2)) - proj.bias  # bias added by each
            assert torch.allclose(got, want, atol=1e-5)
        full = torch.cat([c(x) for c in cols], dim=-1)
        # output features in each rank's local order (a fused layer holds a piece of each of q, k, v)
        order = torch.cat([torch.arange(a, b) for r in range(2) for _, _, a, b in cols[r].weight.tp_slice.pieces])
        assert torch.allclose(full, fc(x)[..., order], atol=1e-5)


def test_pipeline_units_of_the_families_and_of_a_users_split():
    stages, _ = plan_stages(build("llama"), 2, None)
    assert stages[0][0] == ("model.embed_tokens",) and stages[-1][-1] == ("model.norm", "lm_head")
    stages, _ = plan_stages(build("gpt2"), 4, None)
    assert [len(s) for s in stages] == [1, 1, 1, 1]
    stages, _ = plan_stages(UserLM(), 2, ["blocks.1"])
    assert stages == [[("emb",), ("blocks.0",)], [("blocks.1",), ("norm",), ("head",)]]
    with pytest.raises(PlanError, match=r"'blocks.7' does not begin a unit of UserLM[\s\S]*HINT"):
        plan_stages(UserLM(), 2, ["blocks.7"])
    with pytest.raises(PlanError, match=r"UserLM is not a known family[\s\S]*HINT"):
        plan_stages(UserLM(), 2, None)
    with pytest.raises(PlanError, match=r"1 paths for 3 stages"):
        plan_stages(UserLM(), 3, ["blocks.1"])


def test_stages_run_in_order_and_give_the_models_output():
    torch.manual_seed(0)
    for kind, split in (("user", ["blocks.1"]), ("llama", None), ("gpt2", None)):
        full = build(kind).eval()
        ids = torch.randint(0, 96, (2, 7))
        want = full(ids)
        want = want.logits if hasattr(want, "logits") else want
        model = build(kind).eval()
        stages = build_stages(model, 3 if kind != "user" else 2, list(range(3 if kind != "user" else 2)), split)
        h = ids
        for st in stages:
            h = st(h)
        assert torch.allclose(h, want, atol=1e-5), kind


@pytest.mark.unit
def test_the_wire_carries_any_nesting_and_dtype():
    obj = {
        "h": torch.randn(2, 3, requires_grad=True),
        "mask": torch.tensor([[True, False]]),
        "ids": (torch.arange(5, dtype=torch.int16), [torch.ones(2, dtype=torch.bfloat16), None, 3.5]),
    }
    spec, tensors = wire.flatten(obj)
    assert len(tensors) == 4 and [t.dtype for t in wire.grad_leaves(obj)] == [torch.float32]
    back = [wire._from_wire(wire._to_wire(t), list(t.shape), t.dtype) for t in tensors]
    rebuilt = wire._build(spec, back, None)
    assert torch.equal(rebuilt["mask"], obj["mask"]) and rebuilt["mask"].dtype == torch.bool
    assert torch.equal(rebuilt["ids"][0], obj["ids"][0]) and rebuilt["ids"][1][1:] == [None, 3.5]
    assert isinstance(rebuilt["ids"], tuple) and isinstance(rebuilt["ids"][1], list)
    header, n = wire._header({"v": wire.VERSION, "spec": spec})
    assert n % 4 == 0 and wire._parse(header)["spec"] == spec
    with pytest.raises(MeshError, match="cannot travel between stages"):
        wire.flatten(object())


def test_tp_width_attribute_divided_by_plan_or_reported():
    """A forward that splits a colwise output by ``self.hidden``: with ``'block': 'divide:hidden'`` in
    the plan, tp2 equals one process (1e-6); without, the first forward's error is a PlanError naming
    the module, its width attributes and the divide entry."""
    from tests.support.harness import spawn

    for res in spawn("tests.cases.tp_width:width_case", 2, args={"divide": True}):
        assert res["error"] is None and res["max_diff"] <= 1e-6, res
    for res in spawn("tests.cases.tp_width:width_case", 2, args={"divide": False}):
        assert res["error"] and "'block'" in res["error"] and "divide:" in res["error"] and "hidden" in res["error"]
