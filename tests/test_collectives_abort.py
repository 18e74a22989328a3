"""Abort and rebuild (issue #25, recovery without restarting the survivors): a collective blocked on a
peer that stopped taking part wakes with CollectiveAbortedError naming the lost rank@host, and the
survivors build a smaller world in the same processes; shm and torch (gloo). mpi cannot abort (its
communicator says so). One 3-rank job per backend."""

from __future__ import annotations

import secrets

import pytest

import collectives
from collectives.env import DistEnv
from tests.support.harness import RankFailure, spawn

CASES = "tests.cases.abort_cases"


@pytest.mark.timeout(150)
@pytest.mark.parametrize("backend", ["shm", "torch"])
def test_a_collective_blocked_on_a_lost_peer_is_aborted_and_the_world_rebuilt(backend):
    env = {"DISTTRAIN_JOB_ID": "abort" + secrets.token_hex(4)}
    with pytest.raises(RankFailure) as info:  # rank 2 is SIGKILLed by design
        spawn(f"{CASES}:blocked_then_rebuilt", 3, args={"backend": backend}, env=env, timeout=120)
    codes, outputs = info.value.returncodes, info.value.outputs
    assert codes == {0: 0, 1: 0, 2: -9}, (codes, outputs[0][-3000:], outputs[1][-3000:])
    for r in (0, 1):
        woken = next(line for line in outputs[r].splitlines() if line.startswith("WOKEN "))
        # torch: each survivor aborted with the agent's word; shm: rank 1 was woken by rank 0's poison
        assert "CollectiveAbortedError" in woken and "aborted" in woken, woken
        assert "rank 2@" in woken and "lost" in woken, woken
        assert "REBUILT world 2 sum [6.0, 6.0" in outputs[r], outputs[r][-2000:]


@pytest.mark.unit
def test_a_backend_that_cannot_abort_says_so():
    from collectives.backends.mpi.backend import MPIBackend
    from collectives.backends.shm.backend import ShmBackend
    from collectives.backends.torchdist import TorchBackend

    assert ShmBackend.abortable and TorchBackend.abortable and not MPIBackend.abortable

    class _Fake:  # a backend type without abort (MPI's declaration), without starting MPI
        name, abortable, store, checks_inline, device, world_size, rank = "mpi", False, None, False, None, 1, 0

    comm = collectives.Communicator(_Fake(), DistEnv(0, 1, 0, 1, None, None, "single"))
    assert not comm.abortable
    with pytest.raises(collectives.CollectivesError, match="cannot abort"):
        comm.abort("x")
