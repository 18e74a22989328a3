"""Rank functions for tests/test_collectives_shm.py: the shm backend's own paths (staged and
chunked, zero-copy ``alloc`` buffers, async worker, mailboxes), its errors and its cleanup.

Spawned with a small chunk size (DISTTRAIN_SHM_CHUNK_BYTES=65536, SMALL=4096) so modest
tensors take every path: latency path, split reduce-scatter/allgather, multi-chunk rounds.
Expected values are closed-form (the gloo-oracle comparison lives in the conformance suite).
"""

from __future__ import annotations

import os
import signal
import sys
import time

import torch

import collectives
from collectives import CollectiveMismatchError, CollectiveTimeoutError, PeerDiedError, ReduceOp

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int32, torch.int64]
OPS = [ReduceOp.SUM, ReduceOp.AVG, ReduceOp.MIN, ReduceOp.MAX, ReduceOp.PROD]


def _vals(rank: int, n: int, dtype, op=ReduceOp.SUM) -> torch.Tensor:
    i = torch.arange(n, dtype=torch.float64)
    v = 1 + (i + rank) % 2 if op is ReduceOp.PROD else (i % 5) + 2 * rank - 1
    return v.to(dtype)


def _expect(world: int, n: int, dtype, op) -> torch.Tensor:
    rows = torch.stack([_vals(r, n, torch.float64, op) for r in range(world)])
    red = {
        ReduceOp.SUM: rows.sum(0),
        ReduceOp.AVG: rows.mean(0),
        ReduceOp.MIN: rows.min(0).values,
        ReduceOp.MAX: rows.max(0).values,
        ReduceOp.PROD: rows.prod(0),
    }[op]
    return red.to(dtype)


def _eq(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    tol = 1e-2 if got.dtype in (torch.bfloat16, torch.float16) else 1e-6
    ok = (
        torch.allclose(got.double(), want.double(), rtol=tol, atol=tol)
        if got.is_floating_point()
        else torch.equal(got, want)
    )
    if not ok or got.dtype != want.dtype or got.shape != want.shape:
        raise AssertionError(f"{what}: got {got.flatten()[:6].tolist()} expected {want.flatten()[:6].tolist()}")


def _ops(comm) -> list[str]:
    r, w = comm.rank, comm.world_size
    done = []
    for dtype in DTYPES:
        pool = comm.alloc(60_000, dtype)  # zero-copy buffer (collective: every rank, same order)
        for op in OPS:
            if op is ReduceOp.AVG and not dtype.is_floating_point:
                continue
            for n in (0, 1, 37, 3000, 50_000):
                t = _vals(r, n, dtype, op)
                comm.allreduce(t, op)
                _eq(t, _expect(w, n, dtype, op), f"allreduce {dtype} {op} n={n}")
            view = pool[100:50_100]  # at an offset inside the shared buffer
            view.copy_(_vals(r, 50_000, dtype, op))
            comm.allreduce(view, op)
            _eq(view, _expect(w, 50_000, dtype, op), f"allreduce zero-copy {dtype} {op}")
        for n in (5, 40_000):
            for src in range(w):
                t = _vals(r, n, dtype) if r == src else torch.zeros(n, dtype=dtype)
                comm.broadcast(t, src)
                _eq(t, _vals(src, n, dtype), f"broadcast {dtype} n={n} src={src}")
                z = pool[:n]
                z.copy_(_vals(r, n, dtype) if r == src else torch.zeros(n, dtype=dtype))
                comm.broadcast(z, src)
                _eq(z, _vals(src, n, dtype), f"broadcast zero-copy {dtype} n={n}")
        for k in (3, 20_000):  # unequal sizes: rank j sends (j+1)*k elements
            mine = _vals(r, (r + 1) * k, dtype)
            for src in (mine, pool[: mine.numel()]):
                src.copy_(mine)
                outs = [torch.empty((j + 1) * k, dtype=dtype) for j in range(w)]
                comm.allgather(outs, src)
                for j in range(w):
                    _eq(outs[j], _vals(j, (j + 1) * k, dtype), f"allgather {dtype} k={k} from {j}")
        for k in (2, 9000):
            sizes = [(j + 1) * k for j in range(w)]
            flat = _vals(r, sum(sizes), dtype)
            for base in (flat, pool[: flat.numel()]):
                base.copy_(flat)
                out = torch.empty(sizes[r], dtype=dtype)
                comm.reduce_scatter(out, list(base.split(sizes)), ReduceOp.SUM)
                lo = sum(sizes[:r])
                _eq(
                    out,
                    _expect(w, sum(sizes), dtype, ReduceOp.SUM)[lo : lo + sizes[r]],
                    f"reduce_scatter {dtype} k={k}",
                )
        for k in (1, 10_000):  # rank i sends (i + j + 1) * k elements to rank j
            ins = [torch.full(((r + j + 1) * k,), 10 * r + j, dtype=dtype) for j in range(w)]
            outs = [torch.empty((i + r + 1) * k, dtype=dtype) for i in range(w)]
            comm.all_to_all(outs, ins)
            for i in range(w):
                _eq(outs[i], torch.full(((i + r + 1) * k,), 10 * i + r, dtype=dtype), f"all_to_all {dtype} from {i}")
        done.append(f"ops/{str(dtype).removeprefix('torch.')}")
    return done


def _p2p_async_barrier(comm) -> list[str]:
    r, w = comm.rank, comm.world_size
    if w > 1:
        nxt, prv = (r + 1) % w, (r - 1) % w
        for n in (0, 10, 700_000):  # 700k floats = 2.8 MB: more than a pair's mailbox ring
            h = comm.send(torch.full((n,), float(r)), nxt, tag=n % 7, async_op=True)
            got = torch.empty(n)
            comm.recv(got, prv, tag=n % 7)
            h.wait()
            _eq(got, torch.full((n,), float(prv)), f"send/recv n={n}")
    # async: a bucket allreduce overlapping the caller; later ops keep issue order
    bucket = comm.alloc(500_000)
    bucket.fill_(r + 1)
    h = comm.allreduce(bucket, async_op=True)
    small = torch.ones(3)
    h2 = comm.allreduce(small, async_op=True)
    busy = sum(i * i for i in range(20_000))  # the caller keeps computing meanwhile
    h.wait()
    h2.wait()
    after = torch.ones(2)
    comm.allreduce(after)  # sync op after async ones
    _eq(bucket, torch.full((500_000,), float(w * (w + 1) // 2)), "async allreduce")
    _eq(small, torch.full((3,), float(w)), "async small")
    _eq(after, torch.full((2,), float(w)), "sync after async")
    nc = torch.arange(12.0).view(3, 4).t()  # non-contiguous: the communicator stages it
    comm.allreduce(nc)
    _eq(nc, torch.arange(12.0).view(3, 4).t() * w, "non-contiguous")
    comm.barrier()
    return ["p2p", "async", "barrier", str(busy > 0)]


def functional(mismatch_and_timeout: bool = False) -> list[str]:
    comm = collectives.init("shm", timeout=30)
    done = _ops(comm) + _p2p_async_barrier(comm)
    if mismatch_and_timeout and comm.world_size > 1:
        r = comm.rank
        try:  # shapes differ on the last rank: every rank must raise, naming both sides
            comm.allreduce(torch.ones(5 if r == comm.world_size - 1 else 4))
            raise AssertionError("no mismatch error")
        except CollectiveMismatchError as exc:
            msg = str(exc)
            if "shape [4]" not in msg or "shape [5]" not in msg:
                raise AssertionError(f"mismatch message lacks both sides: {msg}") from exc
        t = torch.ones(3)
        comm.allreduce(t)  # still usable: the op never started
        _eq(t, torch.full((3,), float(comm.world_size)), "after mismatch")
        done.append("mismatch")
        if r == comm.world_size - 1:
            time.sleep(4)  # never arrives at the next op; stays alive past the others' timeout
        else:
            try:
                comm.allreduce(torch.ones(2), timeout=1.5)
                raise AssertionError("no timeout error")
            except CollectiveTimeoutError as exc:
                msg = str(exc)
                if f"never arrived: {comm.world_size - 1}" not in msg or "allreduce#" not in msg:
                    raise AssertionError(f"timeout message: {msg}") from exc
        done.append("timeout")
    sys.stdout.flush()
    return done


def groups() -> list[str]:
    comm = collectives.init("shm", timeout=30)
    r = comm.rank
    pair = comm.split(r // 2)  # {0,1} and {2,3}
    odd = comm.new_group([1, 3])
    t = torch.full((30_000,), float(r))
    pair.allreduce(t)
    _eq(t, torch.full((30_000,), float(4 * (r // 2) + 1)), "pair allreduce")
    if odd is not None:
        b = odd.alloc(20_000)
        b.fill_(r)
        odd.allreduce(b, ReduceOp.MAX)
        _eq(b, torch.full((20_000,), 3.0), "odd zero-copy max")
        odd.barrier()
    pair.barrier()
    comm.allreduce(t)  # the world group is unaffected by its sub-groups
    for g in (pair, odd):
        if g is not None:
            g.close()
    comm.close()
    return ["groups", str(odd is not None)]


def dead_peer(kill_rank: int = 1) -> dict:
    """A rank is SIGKILLed in the middle of a large allreduce; the others must raise PeerDiedError."""
    comm = collectives.init("shm", timeout=30)
    big = torch.ones(4_000_000)  # 16 MB through 64 KiB chunks: hundreds of rounds
    comm.allreduce(torch.ones(1))
    if comm.rank == kill_rank:
        h = comm.allreduce(big, async_op=True)  # the worker is mid-op when we die
        time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)
        h.wait()
    # The first allreduce may still pair with the victim's async one when it finished before the
    # kill (a fast machine); the second has no partner, so it must end in PeerDiedError.
    for _ in range(2):
        try:
            comm.allreduce(big)
        except PeerDiedError as exc:
            print(f"DEAD-OK {exc}", flush=True)
            return {"error": str(exc)}
    raise AssertionError("no PeerDiedError")
