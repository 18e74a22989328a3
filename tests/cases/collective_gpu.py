"""Rank functions for the CUDA paths of the collectives (run by tests/test_collectives_gpu.py and
scripts/gpu_check.sh on a machine with NVIDIA GPUs; one rank per GPU).

Every op on CUDA tensors of every dtype, with closed-form expectations (no CPU oracle: the
values are small integers, exact in every dtype), plus a mismatch that must raise on every
rank and leave the group usable, a sub-group, and async overlap. Backends: ``nccl`` (CuPy)
and ``torch`` (torch.distributed's nccl process group).
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

import collectives
from collectives import CollectiveMismatchError, ReduceOp

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int32, torch.int64]


def _store():
    world = int(os.environ["WORLD_SIZE"])
    return dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        int(os.environ["RANK"]) == 0,
        timeout=datetime.timedelta(seconds=120),
    )


def _eq(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    if got.device.type != "cuda" or not torch.equal(got.cpu().double(), want.cpu().double()):
        raise AssertionError(
            f"{what}: got {got.flatten()[:6].tolist()} on {got.device}, want {want.flatten()[:6].tolist()}"
        )


def conformance(backend: str = "nccl") -> list[str]:
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    dev = torch.device("cuda", local)
    comm = collectives.init(backend, store=_store(), timeout=120, device=f"cuda:{local}")
    r, w = comm.rank, comm.world_size
    done = []
    for dtype in DTYPES:
        for op, want in ((ReduceOp.SUM, w * (w + 1) / 2), (ReduceOp.MAX, w), (ReduceOp.MIN, 1)):
            t = torch.full((1000,), r + 1, dtype=dtype, device=dev)
            comm.allreduce(t, op)
            _eq(t, torch.full((1000,), want, dtype=dtype), f"allreduce {op} {dtype}")
        if dtype.is_floating_point:
            t = torch.full((7,), 2 * (r + 1), dtype=dtype, device=dev)
            comm.allreduce(t, ReduceOp.AVG)
            _eq(t, torch.full((7,), w + 1, dtype=dtype), f"allreduce avg {dtype}")
        t = torch.full((33,), r, dtype=dtype, device=dev)
        comm.broadcast(t, w - 1)
        _eq(t, torch.full((33,), w - 1, dtype=dtype), f"broadcast {dtype}")
        outs = [torch.empty(5, dtype=dtype, device=dev) for _ in range(w)]
        comm.allgather(outs, torch.full((5,), r, dtype=dtype, device=dev))
        for i, o in enumerate(outs):
            _eq(o, torch.full((5,), i, dtype=dtype), f"allgather {dtype} from {i}")
        out = torch.empty(4, dtype=dtype, device=dev)
        comm.reduce_scatter(out, [torch.full((4,), i + r, dtype=dtype, device=dev) for i in range(w)])
        _eq(out, torch.full((4,), w * r + w * (w - 1) / 2, dtype=dtype), f"reduce_scatter {dtype}")
        outs = [torch.empty(3, dtype=dtype, device=dev) for _ in range(w)]
        comm.all_to_all(outs, [torch.full((3,), 10 * r + i, dtype=dtype, device=dev) for i in range(w)])
        for i, o in enumerate(outs):
            _eq(o, torch.full((3,), 10 * i + r, dtype=dtype), f"all_to_all {dtype} from {i}")
        done.append(f"ops/{dtype}")
    big = torch.ones(16 << 20, device=dev)  # 64 MiB: the bandwidth path
    h = comm.allreduce(big, async_op=True)
    h.wait()
    _eq(big[:8], torch.full((8,), float(w)), "async 64 MiB allreduce")
    done.append("async")
    if w > 1:
        nxt, prv = (r + 1) % w, (r - 1) % w
        msg = torch.full((9,), r, dtype=torch.int64, device=dev)
        got = torch.empty(9, dtype=torch.int64, device=dev)
        if r % 2 == 0:
            comm.send(msg, nxt)
            comm.recv(got, prv)
        else:
            comm.recv(got, prv)
            comm.send(msg, nxt)
        _eq(got, torch.full((9,), prv, dtype=torch.int64), "send/recv ring")
        done.append("p2p")
        try:  # rank 0 reduces a different shape: every rank must raise, and the group stay usable
            comm.allreduce(torch.ones(3 if r == 0 else 4, device=dev))
        except CollectiveMismatchError:
            done.append("mismatch")
        sub = comm.split(r % 2)
        x = torch.ones(2, device=dev)
        sub.allreduce(x)
        _eq(x, torch.full((2,), float(sub.world_size)), "split allreduce")
        done.append("groups")
    comm.barrier()
    torch.cuda.synchronize()
    comm.close()
    return done
