"""Deferred initialisation gives every rank exactly its part of the eager model, and no rank more.

Each rank builds the model on the meta device (``model.deferred_init``, the default), wraps it with
its strategy and materialises only what it keeps; every piece it keeps (``state_shards()``'s
``model.*`` boxes: ZeRO-3 flat ranges, tensor-parallel slices, its pipeline stages' tensors, buffers)
must equal the same box of one eager process's model on the same seed, bit for bit (the replay runs
the same ops from the same generator state). The memory test builds a 48 MiB model on 2 ranks under
ZeRO-3: each rank's peak resident memory added while building and sharding stays under 3/4 of the
model (an eager build holds the whole model: at least 1x).
"""

import pytest
import torch

from tests.support.harness import spawn

pytestmark = pytest.mark.timeout(300)


def eager(target: str, kwargs: dict) -> dict[str, torch.Tensor]:
    import importlib

    mod, _, fn = target.partition(":")
    torch.manual_seed(0)
    m = getattr(importlib.import_module(mod), fn)(**kwargs)
    return {**dict(m.named_parameters(remove_duplicate=False)), **dict(m.named_buffers())}


def check_pieces(ref: dict, results: list, label: str) -> int:
    n = 0
    for rank, res in enumerate(results):
        for p in res["pieces"]:
            t = ref[p["name"]].detach().float()
            if p["flat"]:
                ((a, b),) = p["box"]
                want = t.reshape(-1)[a:b]
            else:
                want = t[tuple(slice(a, b) for a, b in p["box"])].reshape(-1)
            got = torch.tensor(p["values"])
            assert torch.equal(got, want), f"{label}: rank {rank} {p['name']} box {p['box']} differs"
            n += 1
    return n


CASES = [
    ("tests.cases.deferred:llama", {}, "zero3", 1, 1),
    ("tests.cases.deferred:llama", {}, "ddp", 1, 1),
    ("tests.cases.deferred:llama", {}, "zero1", 2, 1),
    ("tests.cases.deferred:llama", {"layers": 4}, "ddp", 1, 2),
    ("tests.cases.deferred:gpt", {}, "zero3", 1, 1),
    ("tests.cases.deferred:gpt", {}, "ddp", 2, 1),
]


@pytest.mark.parametrize("target,kwargs,strategy,tp,pp", CASES)
def test_deferred_init_equals_eager(target, kwargs, strategy, tp, pp):
    results = spawn(
        "tests.cases.deferred:kept_case",
        2,
        args={"target": target, "kwargs": kwargs, "strategy": strategy, "tp": tp, "pp": pp},
    )
    ref = eager(target, kwargs)
    assert check_pieces(ref, results, f"{target} {strategy} tp{tp} pp{pp}") > 0
