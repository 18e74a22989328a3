"""One conformance suite over every available backend (nccl aside: it needs GPUs), at world
sizes 1, 2, 3 (4 for sub-groups), against torch.distributed gloo as the oracle; plus
mismatch (inside the world-size-2/3 jobs), timeout and dead-peer tests per backend.

Each (backend, world size) is one spawned job running many cases, because starting a
rank costs about 1.5 s of torch import on this machine.
"""

from __future__ import annotations

import pytest

from collectives import registry
from tests.support.harness import RankFailure, spawn

BACKENDS = [b for b in registry.available() if b != "nccl"]
CASES = "tests.cases.collective_conformance"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_conformance(backend, world_size):
    out = spawn(f"{CASES}:conformance", world_size, args={"backend": backend}, timeout=200)
    assert all(o == out[0] for o in out), out
    assert "async" in out[0] and "non-contiguous" in out[0] and "zero-size" in out[0] and "resizable" in out[0]
    assert len([c for c in out[0] if c.startswith("ops/")]) == 6
    assert ("mismatch" in out[0]) == (world_size > 1)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("backend", BACKENDS)
def test_groups_world4(backend):
    out = spawn(f"{CASES}:conformance", 4, args={"backend": backend, "groups": True}, timeout=200)
    assert out == [["groups"]] * 4


@pytest.mark.timeout(240)
@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_world2(backend):
    out = spawn(f"{CASES}:conformance", 2, args={"backend": backend, "check": False}, timeout=200)
    assert "mismatch" not in out[0] and len(out[0]) == 20


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", BACKENDS)
def test_timeout_names_missing_rank(backend):
    out = spawn(f"{CASES}:timeout_case", 2, args={"backend": backend}, timeout=100)
    msg = out[0]["message"]
    assert "allreduce#1" in msg and "never arrived: 1" in msg and "HINT:" in msg, msg
    assert out[0]["elapsed"] < 60, out[0]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", BACKENDS)
def test_dead_peer_is_an_error(backend):
    with pytest.raises(RankFailure) as info:
        spawn(f"{CASES}:dead_peer_case", 2, args={"backend": backend}, timeout=100)
    codes, outputs = info.value.returncodes, info.value.outputs
    assert codes[1] == 7, codes
    assert codes[0] == 0 and "DEADPEER-OK" in outputs[0], outputs[0][-3000:]
