"""Data parallel (bucketed, overlapped allreduce) matches one process on the same global batch.

Every run trains 4 (bf16: 3, GPT: 3) steps, batch 50 in 2 micro-batches (uneven over 3
ranks: 17/17/16), AdamW with global-norm clipping at 0.2 (active from step 2) and tiny
buckets (10 KB, first 2 KB) so several buckets overlap with backward. The reference is the
same code on one process. Tolerances: fp32 5e-5 absolute on every parameter (only the
float32 summation order of the gradient differs; Adam amplifies it a little); bf16 autocast
and bf16 gradient compression 2e-2 (each rank rounds its own partial products in bf16, and
Adam turns tiny gradient differences into up-to-lr-sized update differences).
The spawns are shared with tests/test_zero.py (tests/cases/dp_zero.py runs them once).
"""

import pytest

from tests.cases import dp_zero
from tests.support.equivalence import max_param_diff

pytestmark = pytest.mark.timeout(900)
ATOL = {"bf16": 2e-2, "wire_bf16": 2e-2, "bf16_params": 2e-2}
FP32_ATOL = 5e-5


def check(world: int, backend: str, strategies: list[str]) -> list[str]:
    """Compare every planned (variant, strategy in strategies) run with the reference; return the keys checked."""
    ranks = dp_zero.results(world, backend)
    if ranks is None:
        pytest.skip(f"backend {backend} is not registered in this build")
    ref = dp_zero.results(1, "torch")[0]
    checked = []
    for variant, strategy in dp_zero.PLAN[(world, backend)]:
        if strategy not in strategies:
            continue
        key, rkey = f"{variant}/{strategy}", f"{variant}/ddp"
        atol = ATOL.get(variant, FP32_ATOL)
        for rank, res in enumerate(ranks):
            got, want = res[key], ref[rkey]
            diff = max_param_diff(want["params"], got["params"])
            assert diff <= atol, f"{key} on {world} {backend} ranks (rank {rank}): params differ by {diff:.3g} > {atol}"
            for i, (a, b) in enumerate(zip(want["losses"], got["losses"])):
                assert abs(a - b) <= max(atol, 1e-5), f"{key} on {world} {backend}: loss {i}: {a} vs {b}"
            assert len(got["losses"]) == len(want["losses"])
        # Checkpoint shards: the same logical names as one process, covering each tensor, equal values.
        logical, expected = dp_zero.assemble(ranks, key), dp_zero.assemble([ref], rkey)
        assert sorted(logical) == sorted(expected), f"{key}: shard names differ: {sorted(set(logical) ^ set(expected))}"
        for name, t in expected.items():
            tol = atol if not name.endswith("exp_avg_sq") else max(atol * 1e-2, 1e-8)
            err = float((logical[name] - t).abs().max()) if t.numel() else 0.0
            assert err <= tol * 20, f"{key}: shard {name} differs by {err:.3g}"
        checked.append(key)
    return checked


@pytest.mark.parametrize("world,backend", [(2, "torch"), (3, "torch"), (2, "shm"), (3, "shm")])
def test_ddp_matches_one_process(world, backend):
    keys = check(world, backend, ["ddp"])
    assert keys, "no ddp runs planned"


def test_bf16_parameters_stay_bf16_and_train_under_ddp_and_zero():
    """A model stored in bf16 trains under ddp (bf16 gradient buckets) and ZeRO-1/3 (bf16 flat units, no
    fp32 copy) at 2 ranks, like one process with the same bf16 model (tolerance ATOL["bf16_params"])."""
    ranks = dp_zero.results(2, "torch")
    ref = dp_zero.results(1, "torch")[0]["bf16_params/ddp"]
    assert ref["dtypes"] == ["torch.bfloat16"]
    for strategy in ("ddp", "zero1", "zero3"):
        for rank, res in enumerate(ranks):
            got = res[f"bf16_params/{strategy}"]
            assert got["dtypes"] == ["torch.bfloat16"], f"{strategy} rank {rank}: parameters became {got['dtypes']}"
            diff = max_param_diff(ref["params"], got["params"])
            assert diff <= ATOL["bf16_params"], f"bf16 parameters under {strategy}: differ by {diff:.3g}"


def test_ddp_memory_is_whole_model():
    """Every rank holds everything, whatever the world size: params = grads (bucket buffers), AdamW state 2x."""
    two = dp_zero.results(2, "torch")[0]["adamw/ddp"]["memory"]
    three = dp_zero.results(3, "torch")[0]["adamw/ddp"]["memory"]
    assert two == three and two["grads"] == two["params"] and two["optim"] >= 2 * two["params"]
