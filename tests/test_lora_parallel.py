"""peft LoRA under tensor and pipeline parallel equals one process.

A transformers Llama, every weight frozen, with peft LoRA adapters on ``q_proj``/``v_proj`` (colwise:
the base's output rows and ``lora_B``'s rows split, ``lora_A`` whole) and ``o_proj``/``down_proj``
(rowwise: the base's input columns and ``lora_A``'s columns split, ``lora_B`` whole, the output reduced
once), trains 3 AdamW steps (weight decay 0.1) under tp2, pp2 (2 ranks) and tp2 x pp2 (4 ranks), and in
one process.
Every tensor assembled from the ranks' pieces (peft's ``base_model.model.`` names, tp boxes) equals one
process's within 1e-5 (tp sums partial products in another order), the losses within 1e-5, the frozen
base equals its initial values bit for bit, the adapters trained, only adapters have optimizer state,
and the assembled state strict-loads into a fresh peft model.
"""

import pytest
import torch

from tests.support.harness import spawn
from tests.test_deferred_init import eager

pytestmark = pytest.mark.timeout(300)
TARGET = "tests.cases.lora_parallel:llama_peft"
ATOL = 1e-5


def assemble(results: list, shapes: dict) -> dict[str, torch.Tensor]:
    """Whole tensors from every rank's pieces; every element must be held by some rank."""
    out, seen = {}, {}
    for res in results:
        for p in res["pieces"]:
            n = p["name"]
            t = out.setdefault(n, torch.zeros(shapes[n]))
            c = seen.setdefault(n, torch.zeros(shapes[n], dtype=torch.bool))
            v = torch.tensor(p["values"])
            if p["flat"]:
                ((a, b),) = p["box"]
                t.view(-1)[a:b], c.view(-1)[a:b] = v, True
            else:
                idx = tuple(slice(a, b) for a, b in p["box"])
                t[idx], c[idx] = v.view(t[idx].shape), True
    for n, c in seen.items():
        assert bool(c.all()), f"{n}: not every element is held by some rank"
    return out


@pytest.fixture(scope="module")
def one_process():
    (res,) = spawn("tests.cases.lora_parallel:train_case", 1)
    return res


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)])
def test_lora_under_tp_and_pp_matches_one_process(one_process, tp, pp):
    from tests.cases.lora_parallel import llama_peft

    init = eager(TARGET, {})
    shapes = {n: tuple(t.shape) for n, t in init.items()}
    two = spawn("tests.cases.lora_parallel:train_case", tp * pp, args={"tp": tp, "pp": pp})
    ref, got = assemble([one_process], shapes), assemble(two, shapes)
    assert sorted(ref) == sorted(got) and any(".lora_A." in n for n in got)
    assert any(n.endswith("o_proj.lora_A.default.weight") for n in got)  # a rowwise adapter is there
    for n in ref:
        assert torch.allclose(got[n], ref[n], atol=ATOL, rtol=0), f"tp{tp} pp{pp}: {n} differs from one process"
        if "lora_" not in n:
            assert torch.equal(got[n], init[n].detach().float()), f"tp{tp} pp{pp}: frozen {n} changed"
        elif "lora_B" in n:
            assert not torch.equal(got[n], init[n].detach().float()), f"tp{tp} pp{pp}: {n} did not train"
    last = two[-1]["losses"]  # the last pipeline stage (every tp rank) has the loss
    assert max(abs(a - b) for a, b in zip(last, one_process["losses"])) <= ATOL, (last, one_process["losses"])
    for res in two:
        assert res["optim_names"] and all(".lora_" in n for n in res["optim_names"]), res["optim_names"]
    fresh = llama_peft()
    fresh.load_state_dict(got, strict=True)  # the consolidated state fits a fresh peft model


@pytest.mark.unit
def test_lora_split_shapes_and_prefixed_plan_names():
    """Rank 0 of tp=2, locally: peft's prefix maps to the plan, colwise q_proj keeps lora_A whole and
    halves lora_B's rows, rowwise o_proj halves lora_A's columns and keeps lora_B whole; names stay
    peft's. DoRA is a plan error naming the module."""
    from peft import LoraConfig, get_peft_model

    from disttrain.parallel.adapters import adapted_base, plan_for_base
    from disttrain.parallel.tensor.parallel import TPContext, tp_slice
    from disttrain.parallel.tensor.plan import PlanError, apply_tp_plan
    from tests.cases.deferred import llama
    from tests.cases.lora_parallel import llama_peft

    model = llama_peft()
    base, prefix = adapted_base(model)
    assert prefix == "base_model.model." and type(base).__name__ == "LlamaForCausalLM"
    plan = plan_for_base(
        {f"{prefix}model.layers.*.self_attn.q_proj": "colwise", "model.layers.*.self_attn.o_proj": "rowwise"}, prefix
    )
    assert sorted(plan) == ["model.layers.*.self_attn.o_proj", "model.layers.*.self_attn.q_proj"]
    before = {n: tuple(p.shape) for n, p in model.named_parameters()}
    apply_tp_plan(base, TPContext(None, 2, 0), plan, loss_parallel=False)
    after = dict(model.named_parameters())
    assert sorted(after) == sorted(before)  # peft's names, unchanged
    q, o = f"{prefix}model.layers.0.self_attn.q_proj", f"{prefix}model.layers.0.self_attn.o_proj"
    half_rows = lambda s: (s[0] // 2, *s[1:])  # noqa: E731
    assert tuple(after[f"{q}.base_layer.weight"].shape) == half_rows(before[f"{q}.base_layer.weight"])
    assert tuple(after[f"{q}.lora_B.default.weight"].shape) == half_rows(before[f"{q}.lora_B.default.weight"])
    assert tuple(after[f"{q}.lora_A.default.weight"].shape) == before[f"{q}.lora_A.default.weight"]
    assert tp_slice(after[f"{q}.lora_A.default.weight"]) is None
    r, n_in = before[f"{o}.lora_A.default.weight"]
    assert tuple(after[f"{o}.lora_A.default.weight"].shape) == (r, n_in // 2)
    assert tp_slice(after[f"{o}.lora_A.default.weight"]).dim == 1
    assert tuple(after[f"{o}.lora_B.default.weight"].shape) == before[f"{o}.lora_B.default.weight"]
    with torch.no_grad():
        model(torch.randint(0, 64, (1, 8)))  # runs locally (no tp group): the pieces fit together

    dora = get_peft_model(llama(), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(PlanError, match="q_proj.*DoRA"):
        apply_tp_plan(adapted_base(dora)[0], TPContext(None, 2, 0), {"model.layers.*.self_attn.q_proj": "colwise"})
