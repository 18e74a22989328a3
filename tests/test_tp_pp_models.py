"""Tensor and pipeline parallel on users' models, 4 ranks: each layout equals one process.

Models (tests/cases/mp_models.py): a transformers ``LlamaForCausalLM`` (2 layers, hidden 32,
4 heads, 2 kv heads) and ``GPT2LMHeadModel`` (2 layers, n_embd 32, lm_head tied to wte,
Conv1D layers, fused c_attn) built from their configs with their own / disttrain's family
plan and split, and a user's own small transformer with a plan as YAML would give it
(``USER_PLAN``) and a split by module paths. Random tokens, global batch 8 x 16, 3 AdamW
steps (eps 1e-6), clip 1.0, loss = vocab-parallel cross-entropy summed over the global batch.

Tolerance: max absolute parameter difference 2e-5 after 3 steps, losses within 1e-5. Layouts
differ only in fp32 summation order (tp partial products, dp sums, micro-batch sums); measured
about 3e-6. (Adam's eps is 1e-6 so that exactly-zero gradients, e.g. of key biases under a
shift-invariant softmax, do not turn summation noise into whole learning-rate steps.)

Every layout runs in turn in one 4-rank world; the one-process references run beside it.
"""

from __future__ import annotations

import concurrent.futures
import os

import pytest
import torch

from tests.cases.mp_models import USER_PLAN, USER_SP_PLAN
from tests.cases.mp_train import assemble
from tests.support.harness import spawn

ATOL = 2e-5
LOSS_ATOL = 1e-5

USER_SPLIT2, USER_SPLIT4 = ["blocks.1"], ["blocks.0", "blocks.1", "norm"]


def layouts(model: str) -> dict[str, dict]:
    plan = USER_PLAN if model == "user" else None
    s2, s4 = (USER_SPLIT2, USER_SPLIT4) if model == "user" else (None, None)
    return {
        "dp2xtp2": {"dp": 2, "tp": 2, "pp": 1, "plan": plan},
        "dp2xpp2": {"dp": 2, "tp": 1, "pp": 2, "split": s2},
        "tp2xpp2-gpipe": {"dp": 1, "tp": 2, "pp": 2, "plan": plan, "split": s2, "schedule": "gpipe"},
        "tp2xpp2-1f1b": {"dp": 1, "tp": 2, "pp": 2, "plan": plan, "split": s2, "schedule": "1f1b"},
        "tp2xpp2-interleaved": {
            "dp": 1,
            "tp": 2,
            "pp": 2,
            "plan": plan,
            "split": s4,
            "schedule": "interleaved",
            "v": 2,
        },
    }


MODELS = ["llama", "gpt2", "user"]
EXTRA = {  # name -> run
    "user-sequence-parallel": {"model": "user", "layout": {"dp": 2, "tp": 2, "pp": 1, "plan": USER_SP_PLAN}},
    "llama-zero1": {"model": "llama", "layout": {"dp": 2, "tp": 2, "pp": 1, "strategy": "zero1"}},
    "user-parallelize-hook": {
        "model": "user",
        "layout": {"dp": 2, "tp": 2, "pp": 1, "parallelize": "tests.cases.mp_models:parallelize_user"},
    },
    "llama-step-fn-tp2xpp2": {  # a user's (model, batch) step function through the pipeline, whole logits
        "model": "llama",
        "step_fn": True,
        "layout": {"dp": 1, "tp": 2, "pp": 2, "loss_parallel": False},
    },
    "user-split-target-dp2xpp2": {  # stages from a split target, passing a dict with bool/int16 tensors
        "model": "user",
        "layout": {"dp": 2, "tp": 1, "pp": 2, "split": "tests.cases.mp_models:split_user"},
    },
    "gpt2-gathered-logits": {"model": "gpt2", "layout": {"dp": 2, "tp": 2, "pp": 1, "loss_parallel": False}},
}
DROP = {"model": "user", "dropout": 0.1, "layout": {"dp": 2, "tp": 2, "pp": 1, "plan": USER_PLAN}}
BAD = {  # name -> (plan, words the error must contain)
    "glob": ({"blocks.*.atn.q": "colwise"}, ["parallel.tp.plan", "'blocks.*.atn.q'", "matches no module of UserLM"]),
    "style": ({"blocks.*.norm1": "rowwise"}, ["parallel.tp.plan", "'blocks.*.norm1'", "is a LayerNorm", "HINT"]),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tp_pp"))
    ckpt, rng = os.path.join(out, "llama-ckpt.pt"), os.path.join(out, "drop-rng.pt")
    drop_ckpt = os.path.join(out, "drop-ckpt.pt")
    runs = [
        # first, so the one-process world can resume from it while the rest runs
        {
            "name": "llama-ckpt",
            "model": "llama",
            "layout": layouts("llama")["tp2xpp2-1f1b"],
            "stop_at": 1,
            "save_full": ckpt,
        },
    ]
    runs += [{"name": f"{m}-{n}", "model": m, "layout": lay} for m in MODELS for n, lay in layouts(m).items()]
    runs += [{"name": n, **r} for n, r in EXTRA.items()]
    runs += [
        {"name": "llama-resume-dp4", "model": "llama", "ddp": True, "load_from": ckpt, "start_step": 1},
        {"name": "drop-a", **DROP},
        {"name": "drop-b", **DROP},
        {"name": "drop-ckpt", **DROP, "stop_at": 1, "save_full": drop_ckpt, "save_rng": rng},
        {"name": "drop-resume", **DROP, "load_from": drop_ckpt, "rng_from": rng, "start_step": 1},
        {
            "name": "drop-resume-control",
            **DROP,
            "load_from": drop_ckpt,
            "rng_from": rng,
            "start_step": 1,
            "forget_tp_stream": True,
        },
    ]
    runs += [
        {"name": f"bad-{n}", "model": "user", "layout": {"dp": 2, "tp": 2, "pp": 1, "plan": plan}, "expect_error": True}
        for n, (plan, _) in BAD.items()
    ]
    refs = [{"name": f"ref-{m}", "model": m, "reference": True} for m in MODELS]
    refs.append({"name": "llama-resume-1proc", "model": "llama", "reference": True, "load_from": ckpt, "start_step": 1})
    pool = concurrent.futures.ThreadPoolExecutor(1)
    ref = pool.submit(spawn, "tests.cases.mp_models:many", 1, args={"runs": refs, "out_dir": out}, timeout=900)
    results = spawn("tests.cases.mp_models:many", 4, args={"runs": runs, "out_dir": out}, timeout=900)
    ref_results = ref.result()[0]
    pool.shutdown()
    return out, results, ref_results


def _full(out: str, name: str, ranks: int) -> dict[str, torch.Tensor]:
    return assemble([os.path.join(out, name, f"rank{r}.pt") for r in range(ranks)])


def _compare(world, name: str, model: str, ranks: int = 4, ref: str | None = None):
    out, results, refs = world
    want, got = _full(out, f"ref-{model}", 1), _full(out, name, ranks)
    params = sorted(k for k in want if k.startswith("model."))
    assert params == sorted(k for k in got if k.startswith("model.")), f"{name}: parameter names differ"
    opt = [k for k in want if k.startswith("optim.") and k.endswith("exp_avg_sq")]
    assert opt and all(k in got for k in opt), f"{name}: optimizer state missing from the shards"
    diff = max(float((want[k] - got[k]).abs().max()) for k in params + opt)
    assert diff <= ATOL, f"{name}: differs from one process by {diff:.3g} (tolerance {ATOL})"
    ref_losses = refs[f"ref-{model}"]["losses"]
    all_results = results if ranks == 4 else [refs]
    for r, res in enumerate(all_results):
        losses = res[name]["losses"]
        tail = ref_losses[len(ref_losses) - len(losses) :]
        assert losses and all(abs(a - b) <= LOSS_ATOL for a, b in zip(tail, losses)), (
            f"{name} rank {r}: {losses} vs {tail}"
        )


@pytest.mark.timeout(900)
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("layout", list(layouts("user")))
def test_layout_matches_one_process(world, model, layout):
    _compare(world, f"{model}-{layout}", model)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", list(EXTRA))
def test_other_ways_in_match_one_process(world, name):
    _compare(world, name, EXTRA[name]["model"])


@pytest.mark.timeout(900)
def test_tp2_pp2_checkpoint_of_llama_resumes_as_dp4_and_as_one_process(world):
    _compare(world, "llama-resume-dp4", "llama")
    _compare(world, "llama-resume-1proc", "llama", ranks=1)


@pytest.mark.timeout(900)
def test_dropout_under_tp_is_deterministic_and_resumes_bit_exactly(world):
    out, results, _ = world
    a, b, resumed = _full(out, "drop-a", 4), _full(out, "drop-b", 4), _full(out, "drop-resume", 4)
    plain = _full(out, "user-dp2xtp2", 4)
    for k in a:
        if k.startswith("model."):
            assert torch.equal(a[k], b[k]), f"{k}: two runs with one seed differ"
            assert torch.equal(a[k], resumed[k]), f"{k}: the resumed run differs from the uninterrupted one"
    assert results[0]["drop-a"]["losses"] == results[0]["drop-b"]["losses"]
    assert results[0]["drop-a"]["losses"][1:] == results[0]["drop-resume"]["losses"]
    # dropout really acted: the run differs from the same layout without dropout
    assert max(float((a[k] - plain[k]).abs().max()) for k in a if k.startswith("model.")) > 1e-4
    # and the checkpointed tp-sharded stream matters: resuming without it draws other masks
    control = _full(out, "drop-resume-control", 4)
    assert any(not torch.equal(a[k], control[k]) for k in a if k.startswith("model."))


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", list(BAD))
def test_bad_plan_is_a_config_error_naming_key_glob_and_module(world, name):
    _, results, _ = world
    for r in range(4):
        res = results[r][f"bad-{name}"]
        assert res["error"] and res["config_error"], f"rank {r}: {res}"
        for word in BAD[name][1]:
            assert word in res["error"], f"{word!r} missing from: {res['error']}"
