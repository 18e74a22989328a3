"""The shm backend's own tests: every op and dtype on each path (latency, chunked, zero-copy,
async, mailboxes) at world sizes 1-4, mismatch, timeout, a SIGKILLed peer, and nothing left
in /dev/shm afterwards. One spawned job per world size (a rank costs seconds of torch import).
"""

from __future__ import annotations

import os
import secrets

import pytest
import torch

import collectives
from collectives.backends.shm.segment import DEV_SHM
from collectives.env import DistEnv
from tests.support.harness import RankFailure, spawn

CASES = "tests.cases.shm_cases"
SMALL_CHUNKS = {"DISTTRAIN_SHM_CHUNK_BYTES": "65536", "DISTTRAIN_SHM_SMALL_BYTES": "4096"}


def _job() -> dict:
    job = "shmtest" + secrets.token_hex(4)
    return {**SMALL_CHUNKS, "DISTTRAIN_JOB_ID": job}


def _leftovers(env: dict) -> list[str]:
    return [f for f in os.listdir(DEV_SHM) if env["DISTTRAIN_JOB_ID"] in f]


@pytest.mark.unit
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_average_by_a_power_of_two_is_the_division_bit_for_bit(dtype):
    """AVG over 2, 4, 8 ranks multiplies by the exact reciprocal instead of dividing: the same bits as
    ``div_`` on every value, subnormals, infinities, NaN and -0 included (torch and numpy paths)."""
    import numpy as np

    from collectives.backends.shm.kernels import NUMPY_DTYPES, divide, numpy_reducer, reduce_numpy

    info = torch.finfo(dtype)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), info.tiny, -info.tiny, info.max])
    subnormal = torch.tensor([info.tiny * k / 64 for k in range(1, 64)])
    gen = torch.Generator().manual_seed(0)
    t = torch.cat([special, subnormal, torch.randn(4096, generator=gen) * 1e3, torch.rand(4096, generator=gen)])
    t = t.to(dtype)
    for world in (2, 4, 8):
        got = t.clone()
        divide(got, world)
        want = t.clone().div_(world)
        assert torch.equal(got.view(-1).view(torch.uint8), want.view(-1).view(torch.uint8)), (dtype, world)
        if dtype in NUMPY_DTYPES:
            rows = np.stack([t.numpy(), np.zeros_like(t.numpy())] + [np.zeros_like(t.numpy())] * (world - 2))
            out = np.empty_like(rows[0])
            reduce_numpy(numpy_reducer(rows, collectives.ReduceOp.AVG), out)
            assert out.tobytes() == (rows.sum(0) / world).tobytes(), (dtype, world)


@pytest.mark.unit
@pytest.mark.timeout(60)
def test_world1_in_process():
    env = DistEnv(0, 1, 0, 1, None, None, "single")
    comm = collectives.init("shm", env=env, timeout=10)
    t = torch.arange(6.0)
    comm.allreduce(t, collectives.ReduceOp.AVG)
    b = comm.alloc((2, 3), torch.bfloat16)
    b.fill_(2)
    comm.allreduce(b)
    outs = [torch.empty(4, dtype=torch.int64)]
    comm.allgather(outs, torch.arange(4))
    out = torch.empty(3)
    comm.reduce_scatter(out, [torch.ones(3)])
    comm.barrier()
    comm.close()
    assert t.tolist() == list(range(6)) and b.float().sum() == 12 and outs[0].tolist() == [0, 1, 2, 3]
    assert out.tolist() == [1.0] * 3


@pytest.mark.timeout(200)
@pytest.mark.parametrize("world_size", [2, 3])
def test_every_op_and_dtype(world_size):
    env = _job()
    out = spawn(f"{CASES}:functional", world_size, args={"mismatch_and_timeout": world_size == 3}, env=env, timeout=180)
    assert all(o[:-2] == out[0][:-2] for o in out), out
    assert len([c for c in out[0] if c.startswith("ops/")]) == 6 and "async" in out[0]
    if world_size == 3:
        assert "mismatch" in out[0] and "timeout" in out[0]
    assert not _leftovers(env)


@pytest.mark.timeout(200)
def test_groups_world4():
    env = _job()
    out = spawn(f"{CASES}:groups", 4, env=env, timeout=180)
    assert [o[1] for o in out] == ["False", "True", "False", "True"]
    assert not _leftovers(env)


@pytest.mark.timeout(120)
def test_sigkilled_peer_is_an_error_and_leaves_nothing():
    env = _job()
    with pytest.raises(RankFailure) as info:
        spawn(f"{CASES}:dead_peer", 2, env=env, timeout=100)
    codes, outputs = info.value.returncodes, info.value.outputs
    assert codes[1] == -9 and codes[0] == 0, (codes, outputs[0][-2000:])
    assert "DEAD-OK" in outputs[0] and "group rank 1" in outputs[0] and "died" in outputs[0], outputs[0][-2000:]
    assert not _leftovers(env)
