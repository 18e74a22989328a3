"""Rank functions of the collectives conformance suite, one spawned job per (backend, world size).

Values are compared with torch.distributed gloo used directly (the oracle) where it has
the op, and with closed-form expectations where it has not (all_to_all, send/recv).
Each function returns the names of the cases it ran, so the test can check every rank
ran all of them.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time

import torch
import torch.distributed as dist

import collectives
from collectives import CollectiveMismatchError, CollectiveTimeoutError, InvalidTensorError, PeerDiedError, ReduceOp

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int32, torch.int64]
OPS = [ReduceOp.SUM, ReduceOp.AVG, ReduceOp.MIN, ReduceOp.MAX, ReduceOp.PROD]
_DIST_OPS = {
    ReduceOp.SUM: dist.ReduceOp.SUM,
    ReduceOp.AVG: dist.ReduceOp.SUM,
    ReduceOp.MIN: dist.ReduceOp.MIN,
    ReduceOp.MAX: dist.ReduceOp.MAX,
    ReduceOp.PROD: dist.ReduceOp.PRODUCT,
}


def _store(timeout: float = 60.0):
    if os.environ.get("MASTER_ADDR") is None:
        return None
    world = int(os.environ["WORLD_SIZE"])
    return dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        int(os.environ["RANK"]) == 0,
        timeout=datetime.timedelta(seconds=timeout),
    )


def setup(backend: str, check: bool = True, timeout: float = 60.0, oracle: bool = True, store=None):
    """The communicator under test and, separately, a gloo process group used as the oracle.
    ``store``: the job's store when the caller made it (``_store()``), else made here."""
    store = _store() if store is None else store
    comm = collectives.init(backend, store=store, check=check, timeout=timeout)
    group = None
    if oracle:
        if not dist.is_initialized():
            dist.init_process_group(
                "gloo",
                store=dist.PrefixStore("oracle", store),
                rank=comm.rank,
                world_size=comm.world_size,
                timeout=datetime.timedelta(seconds=timeout),
            )
        group = dist.new_group(backend="gloo")  # its own group, apart from the torch backend's
    return comm, group


def finish(result) -> None:
    """Write the result where tests.support.rank_main would, then leave without running destructors
    (a timed-out transport may still hold a thread that would block interpreter exit)."""
    with open(sys.argv[3], "w") as f:
        json.dump(result, f)
    sys.stdout.flush()
    os._exit(0)


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.dtype in (torch.bfloat16, torch.float16):  # MPI/shm may reduce half types in float32
        ok = torch.allclose(a.double(), b.double(), rtol=2e-2, atol=1e-2)
    else:
        ok = (
            torch.allclose(a.double(), b.double(), rtol=1e-6, atol=1e-6) if a.is_floating_point() else torch.equal(a, b)
        )
    if not ok or a.shape != b.shape or a.dtype != b.dtype:
        raise AssertionError(
            f"{what}: got {a.flatten()[:8].tolist()} {a.dtype} {tuple(a.shape)}, "
            f"expected {b.flatten()[:8].tolist()} {b.dtype} {tuple(b.shape)}"
        )


def _values(rank: int, n: int, dtype: torch.dtype, op: ReduceOp = ReduceOp.SUM) -> torch.Tensor:
    base = torch.arange(n, dtype=torch.float64) % 7
    if op is ReduceOp.PROD:  # keep products small and exact
        vals = 1 + (base + rank) % 2
    else:
        vals = base + 3 * rank - 2
    return vals.to(dtype)


def run_conformance(comm, oracle) -> list[str]:
    r, w = comm.rank, comm.world_size
    done = []
    for dtype in DTYPES:
        for op in OPS:
            if op is ReduceOp.AVG and not dtype.is_floating_point:
                with_error(
                    lambda dtype=dtype, op=op: comm.allreduce(torch.ones(3, dtype=dtype), op), InvalidTensorError
                )
                continue
            t = _values(r, 37, dtype, op)
            want = t.clone()
            dist.all_reduce(want, _DIST_OPS[op], group=oracle)
            if op is ReduceOp.AVG:
                want.div_(w)
            comm.allreduce(t, op)
            _close(t, want, f"allreduce {op} {dtype}")
        done.append(f"allreduce/{dtype}")

        src = w - 1
        t = _values(r, 11, dtype)
        want = t.clone()
        dist.broadcast(want, src, group=oracle)
        comm.broadcast(t, src)
        _close(t, want, f"broadcast {dtype}")

        # allgather, equal then unequal sizes (rank 0 contributes nothing in the unequal case)
        mine = _values(r, 5, dtype).reshape(5, 1)
        outs = [torch.empty(5, 1, dtype=dtype) for _ in range(w)]
        comm.allgather(outs, mine)
        want = [torch.empty(5, 1, dtype=dtype) for _ in range(w)]
        dist.all_gather(want, mine, group=oracle)
        for i in range(w):
            _close(outs[i], want[i], f"allgather {dtype} from {i}")
        sizes = [2 * i for i in range(w)]
        mine = _values(r, sizes[r], dtype)
        outs = [torch.full((s,), -1, dtype=dtype) for s in sizes]
        comm.allgather(outs, mine)
        for i in range(w):
            _close(outs[i], _values(i, sizes[i], dtype), f"allgather unequal {dtype} from {i}")

        # reduce_scatter with unequal chunks
        chunks = [3 + i for i in range(w)]
        ins = [_values(r + i, chunks[i], dtype) for i in range(w)]
        out = torch.empty(chunks[r], dtype=dtype)
        comm.reduce_scatter(out, ins, ReduceOp.SUM)
        flat = torch.cat(ins)
        dist.all_reduce(flat, group=oracle)
        start = sum(chunks[:r])
        _close(out, flat[start : start + chunks[r]], f"reduce_scatter {dtype}")
        if dtype.is_floating_point:
            comm.reduce_scatter(out, ins, ReduceOp.AVG)
            _close(out, flat[start : start + chunks[r]] / w, f"reduce_scatter avg {dtype}")
        # the same from parts of one buffer (mpi sends it as it lies), then into a part of that buffer
        whole = torch.cat([_values(r + i, chunks[i], dtype) for i in range(w)])
        parts = list(whole.split(chunks))
        comm.reduce_scatter(out, parts, ReduceOp.SUM)
        _close(out, flat[start : start + chunks[r]], f"reduce_scatter from one buffer {dtype}")
        comm.reduce_scatter(parts[r], parts, ReduceOp.SUM)  # output aliasing an input (as ZeRO's shards may)
        _close(parts[r], flat[start : start + chunks[r]], f"reduce_scatter into its own input {dtype}")

        # all_to_all with split sizes; size (src + dst) % 3 includes zero-size pairs
        ins = [torch.full(((r + d) % 3, 2), 10 * r + d, dtype=dtype) for d in range(w)]
        outs = [torch.empty(((s + r) % 3, 2), dtype=dtype) for s in range(w)]
        comm.all_to_all(outs, ins)
        for s in range(w):
            _close(outs[s], torch.full(((s + r) % 3, 2), 10 * s + r, dtype=dtype), f"all_to_all {dtype} from {s}")

        # send/recv around a ring, async, so no rank's send waits on its own recv
        if w > 1:
            nxt, prv = (r + 1) % w, (r - 1) % w
            got = torch.empty(4, dtype=dtype)
            hs = comm.send(_values(r, 4, dtype), nxt, tag=3, async_op=True)
            hr = comm.recv(got, prv, tag=3, async_op=True)
            hr.wait()
            hs.wait()
            _close(got, _values(prv, 4, dtype), f"send/recv {dtype}")
        done.append(f"ops/{dtype}")

    # non-contiguous in and out
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4) + r
    t = base.t()
    want = t.contiguous()
    dist.all_reduce(want, group=oracle)
    comm.allreduce(t, ReduceOp.SUM)
    _close(t, want, "allreduce non-contiguous")
    _close(base.t(), want, "allreduce non-contiguous wrote through to its base")
    big = torch.zeros(w, 6)
    outs = [big[i, ::2] for i in range(w)]
    comm.allgather(outs, torch.full((3,), float(r)))
    _close(big[:, ::2], torch.arange(w, dtype=torch.float32)[:, None].expand(w, 3), "allgather into strided outputs")
    done.append("non-contiguous")

    # allgather whose own part is small but whose other parts are not (shm: latency path refused, staged)
    # Each call sends values no earlier op left in the staging slots, so a rank reading the wrong slot fails.
    sizes = [1] + [40_000] * (w - 1)
    outs = [torch.full((n,), -1.0) for n in sizes]
    for k in (1, 2):  # the second time with the signature known
        comm.allgather(outs, _values(r, sizes[r], torch.float32) + 1000 * k)
        for i in range(w):
            _close(outs[i], _values(i, sizes[i], torch.float32) + 1000 * k, f"allgather small-and-large from {i}")
    t = _values(r, 5, torch.float32) + 5000
    comm.allreduce(t)  # the staging rounds still agree afterwards
    want = sum(_values(i, 5, torch.float32) + 5000 for i in range(w))
    _close(t, want, "allreduce after small-and-large allgather")
    done.append("allgather-mixed")

    # allgather into separate outputs in any address order, the input being this rank's own output or a
    # tensor in between two outputs (mpi: received straight into the outputs where they lie)
    pool = torch.full((3 * w + 2,), -1.0)
    outs = [pool[3 * (w - 1 - i) : 3 * (w - i)] for i in range(w)]  # descending addresses
    for k in (1, 2):
        outs[r].copy_(_values(r, 3, torch.float32) + 100 * k)
        comm.allgather(outs, outs[r])
        for i in range(w):
            _close(outs[i], _values(i, 3, torch.float32) + 100 * k, f"allgather in place, descending, from {i}")
    gap = torch.full((6 * w,), -1.0)
    outs = [gap[6 * i : 6 * i + 2] for i in range(w)]
    src = gap[6 * r + 3 : 6 * r + 5]  # between this rank's output and the next one
    src.copy_(_values(r, 2, torch.float32) + 7)
    comm.allgather(outs, src)
    for i in range(w):
        _close(outs[i], _values(i, 2, torch.float32) + 7, f"allgather with the input between outputs, from {i}")
    _close(gap[6 * r + 3 : 6 * r + 5], _values(r, 2, torch.float32) + 7, "allgather left its input alone")
    done.append("allgather-scattered")

    # the caller's storage stays the caller's: after small and large ops it can still be resized
    # (ZeRO-3 frees gathered parameters so; Tensor.numpy() on an operand would forbid it for good)
    for n in (7, 40_000):
        t, out = _values(r, n, torch.float32), torch.empty(n * w)
        ins = [_values(r, n, torch.float32) for _ in range(w)]
        comm.allreduce(t)
        comm.allgather(list(out.chunk(w)), t)
        comm.reduce_scatter(t, ins)
        comm.broadcast(out, 0)
        for x in (t, out, *ins):
            x.untyped_storage().resize_(0)
            x.untyped_storage().resize_(4)
    done.append("resizable")

    # one operand again and again, then another of its signature (the carried frame's fast path binds an
    # operand's bytes once; unchecked communicators ride in the frame too): every result right
    for op in (ReduceOp.SUM, ReduceOp.AVG):
        a, b = torch.empty(1024), torch.empty(1024)
        for x in (a, a, a, b, a):
            x.copy_(_values(r, 1024, torch.float32))
            want = sum(_values(i, 1024, torch.float32) for i in range(w)) / (w if op is ReduceOp.AVG else 1)
            comm.allreduce(x, op)
            _close(x, want, f"repeated {op} allreduce of one operand")

    # zero-size
    z = torch.empty(0, 3)
    comm.allreduce(z)
    comm.broadcast(torch.empty(0), 0)
    done.append("zero-size")

    # async: several in flight, waited in reverse
    ts = [torch.full((1000,), float(r + i)) for i in range(4)]
    hs = [comm.allreduce(t, ReduceOp.AVG, async_op=True) for t in ts]
    for h in reversed(hs):
        h.wait()
        h.wait()  # twice is fine
    for i, t in enumerate(ts):
        _close(t, torch.full((1000,), (w - 1) / 2 + i), f"async allreduce {i}")
    done.append("async")

    comm.barrier()
    comm.barrier(timeout=30)
    done.append("barrier")

    with_error(lambda: comm.allreduce(torch.ones(2, dtype=torch.complex64)), InvalidTensorError)
    with_error(lambda: comm.allreduce(torch.ones(2, dtype=torch.bool)), InvalidTensorError)
    with_error(lambda: comm.broadcast(torch.ones(2), src=w), InvalidTensorError)
    with_error(lambda: comm.allgather([torch.ones(2)] * (w + 1), torch.ones(2)), InvalidTensorError)
    done.append("refusals")

    if w > 1 and comm.check:
        done += run_mismatches(comm)
    return done


def with_error(fn, cls, contains: tuple[str, ...] = ()) -> str:
    try:
        fn()
    except cls as exc:
        text = str(exc)
        for c in contains:
            if c not in text:
                raise AssertionError(f"{cls.__name__} message lacks {c!r}:\n{text}") from exc
        return text
    raise AssertionError(f"expected {cls.__name__}")


def run_mismatches(comm) -> list[str]:
    """Every rank must raise, naming both sides; the group must stay usable afterwards."""
    r = comm.rank
    t0 = time.monotonic()
    n = 4 if r == 0 else 5
    text = with_error(
        lambda: comm.allreduce(torch.ones(n)),
        CollectiveMismatchError,
        ("rank 0: allreduce", "shape [4]", "shape [5]", "collective_conformance.py:"),
    )
    other = 1 if r == 0 else 0
    if f"rank {other}:" not in text:
        raise AssertionError(f"mismatch message does not name rank {other}:\n{text}")
    if r == 0:
        with_error(lambda: comm.allreduce(torch.ones(3)), CollectiveMismatchError, ("allreduce", "broadcast"))
    else:
        with_error(lambda: comm.broadcast(torch.ones(3), 0), CollectiveMismatchError, ("allreduce", "broadcast"))
    dt = torch.float64 if r == 1 else torch.float32
    with_error(lambda: comm.allreduce(torch.ones(3, dtype=dt)), CollectiveMismatchError, ("float32", "float64"))
    # signatures seen before take the fast path (cached validation, reused fingerprint): it checks as well,
    # and each side still names its own call site
    six = torch.ones(6)
    for op in (ReduceOp.SUM, ReduceOp.MAX, ReduceOp.SUM):
        comm.allreduce(six, op)
    text = with_error(
        lambda: comm.allreduce(six, ReduceOp.SUM if r == 0 else ReduceOp.MAX), CollectiveMismatchError, ("op=",)
    )
    sides = [line for line in text.splitlines() if line.strip().startswith("rank ")]
    if len(sides) != 2 or not all("collective_conformance.py:" in line for line in sides):
        raise AssertionError(f"fast-path mismatch does not name both sides and their call sites:\n{text}")

    def my_site(text: str) -> str:
        return next(line for line in text.splitlines() if line.strip().startswith(f"rank {r}:")).rsplit(" at ", 1)[1]

    # the same mismatch again, from another line, names that line (the fingerprint the fast path reuses
    # must not keep the site the first error resolved)
    comm.allreduce(six)
    again = with_error(
        lambda: comm.allreduce(six, ReduceOp.SUM if r == 0 else ReduceOp.MAX), CollectiveMismatchError, ("op=",)
    )
    if my_site(again) == my_site(text):
        raise AssertionError(f"a second fast-path mismatch names the first one's call site:\n{text}\n{again}")
    # mismatches between ops that both ride in the carried check's frame (mpi, torch: same transport message
    # on every rank, so only the carried header words can tell): the same numel in other shapes, SUM against
    # AVG, 4 KiB against 4000 bytes (without the fixed frame MPICH hangs and gloo aborts); the operand is
    # left as it was (no wrong result is handed back)
    for mine, theirs in (((2, 3), (3, 2)), ((1024,), (1000,))):
        for shape in (mine, theirs):  # both signatures seen before on every rank: the fast path
            comm.allreduce(torch.zeros(shape))
        x = torch.full(mine if r == 0 else theirs, float(r + 1))
        with_error(lambda x=x: comm.allreduce(x), CollectiveMismatchError, ("shape [",))
        _close(x, torch.full_like(x, float(r + 1)), "operand after a carried mismatch")
    y = torch.full((5,), float(r + 1))
    with_error(
        lambda: comm.allreduce(y, ReduceOp.SUM if r == 0 else ReduceOp.AVG), CollectiveMismatchError, ("op=avg",)
    )
    _close(y, torch.full((5,), float(r + 1)), "operand after a carried SUM/AVG mismatch")
    # a bound operand on the fast path (it rode in the frame twice) against another op: both sides named,
    # the operand unchanged
    z = torch.full((8,), float(r + 1))
    comm.allreduce(z)
    comm.allreduce(z)
    z.fill_(float(r + 1))
    if r == 0:
        with_error(lambda: comm.allreduce(z), CollectiveMismatchError, ("allreduce", "broadcast"))
    else:
        with_error(lambda: comm.broadcast(z, 0), CollectiveMismatchError, ("allreduce", "broadcast"))
    _close(z, torch.full((8,), float(r + 1)), "operand after a fast-path carried mismatch")
    # a synchronous 4 KiB SUM (it rides in the frame on mpi and torch) against the same call with
    # async_op=True (which sends the header alone there): on those backends both sides raise and the operand
    # is unchanged, where the synchronous side used to sum the other's stale frame payload and hand it back;
    # on the others (shm checks inline) both ops complete with the right sum
    comm.allreduce(torch.ones(1024))  # the signature seen before on every rank: the fast path
    a = torch.full((1024,), float(r + 1))
    if comm._frame is not None:
        if r == 0:
            with_error(lambda: comm.allreduce(a), CollectiveMismatchError, ("async_op=True",))
        else:
            with_error(lambda: comm.allreduce(a, async_op=True), CollectiveMismatchError, ("async_op=True",))
        _close(a, torch.full((1024,), float(r + 1)), "operand after a sync/async carried mismatch")
    else:
        work = comm.allreduce(a) if r == 0 else comm.allreduce(a, async_op=True)
        if work is not None:
            work.wait()
        total = float(sum(range(1, comm.world_size + 1)))
        _close(a, torch.full((1024,), total), "sync against async allreduce")
    # p2p: the receiver names both sides
    if r == 0:
        comm.send(torch.ones(3), 1)
    elif r == 1:
        with_error(
            lambda: comm.recv(torch.ones(3, dtype=torch.float64), 0),
            CollectiveMismatchError,
            ("p2p", "float32", "float64"),
        )
    comm.barrier()
    t = torch.ones(3)
    comm.allreduce(t)  # still works
    _close(t, torch.full((3,), float(comm.world_size)), "allreduce after mismatches")
    elapsed = time.monotonic() - t0
    if elapsed > 60:
        raise AssertionError(f"mismatch detection took {elapsed:.1f}s")
    return ["mismatch"]


def run_groups(comm, oracle) -> list[str]:
    """World size 4: new_group and split, with values checked against gloo subgroups."""
    r, w = comm.rank, comm.world_size
    evens = comm.new_group([i for i in range(w) if i % 2 == 0])
    if (evens is None) != (r % 2 == 1):
        raise AssertionError(f"new_group membership wrong on rank {r}")
    sub = comm.split(r % 2)
    sub_oracles = [dist.new_group([i for i in range(w) if i % 2 == c], backend="gloo") for c in (0, 1)]
    g = sub_oracles[r % 2]
    if sub.world_size != len([i for i in range(w) if i % 2 == r % 2]) or sub.rank != r // 2:
        raise AssertionError(f"split gave rank {sub.rank}/{sub.world_size} on world rank {r}")
    for dtype in DTYPES:
        t = _values(r, 9, dtype)
        want = t.clone()
        dist.all_reduce(want, group=g)
        sub.allreduce(t)
        _close(t, want, f"split allreduce {dtype}")
        b = _values(r, 3, dtype)
        want = b.clone()
        dist.broadcast(want, src=r % 2 + 2 * (sub.world_size - 1), group=g)  # last member, as a global rank
        sub.broadcast(b, src=sub.world_size - 1)
        _close(b, want, f"split broadcast {dtype}")
    if evens is not None:
        outs = [torch.empty(2) for _ in range(evens.world_size)]
        evens.allgather(outs, torch.full((2,), float(r)))
        _close(torch.stack(outs), torch.tensor([[0.0, 0.0], [2.0, 2.0]]), "new_group allgather")
        if evens.check:
            x = torch.ones(2 if r == 0 else 3)
            text = with_error(lambda: evens.allreduce(x), CollectiveMismatchError, ("group '[0,2]'",))
            if "rank 2:" not in text and "rank 0:" not in text:
                raise AssertionError(f"sub-group mismatch should name global ranks:\n{text}")
    # sub-groups of a sub-group, and p2p inside one
    pair = sub.split(0)
    if sub.world_size > 1:
        got = torch.empty(2)
        if pair.rank == 0:
            pair.send(torch.full((2,), float(r)), 1)
        else:
            pair.recv(got, 0)
            _close(got, torch.full((2,), float(r - 2)), "p2p in a sub-group")
    none = comm.split(-1 if r == 0 else 1)
    if (none is None) != (r == 0):
        raise AssertionError("split with a negative color should return None")
    comm.barrier()
    return ["groups"]


def conformance(backend: str, check: bool = True, groups: bool = False) -> list[str]:
    comm, oracle = setup(backend, check=check)
    done = run_groups(comm, oracle) if groups else run_conformance(comm, oracle)
    comm.barrier()
    comm.close()
    return done


def timeout_case(backend: str, op_timeout: float = 2.0, check: bool = True) -> dict:
    """Rank 1 never calls the collective; rank 0 must time out naming rank 1 and the call number.

    Rank 1 stays alive until rank 0 has its error (a key in the job's store), however late rank 0
    gets there: a rank 1 that left while rank 0 still waited in the op would make it a dead peer
    (under MPI, a rank leaving without MPI_Finalize), not a missing one."""
    store = _store()  # the harness's; not every backend keeps it (shm names the missing rank without one)
    if store is None:
        raise AssertionError("timeout_case needs the job's store to hold rank 1 until rank 0 is done")
    comm, _ = setup(backend, check=check, oracle=False, store=store)
    comm.allreduce(torch.ones(2))  # call #0 completes
    out = {"rank": comm.rank}
    wait = datetime.timedelta(seconds=90)
    if comm.rank == 1:
        store.wait(["timeout_case/diagnosed"], wait)
        store.set("timeout_case/left", b"1")  # rank 0 hosts the store: it leaves after this answer
    else:
        t0 = time.monotonic()
        try:
            text = with_error(
                lambda: comm.allreduce(torch.ones(2), timeout=op_timeout),
                CollectiveTimeoutError,
                ("allreduce#1", "never arrived: 1"),
            )
            out.update(elapsed=time.monotonic() - t0, message=text)
        finally:
            store.set("timeout_case/diagnosed", b"1")
            store.wait(["timeout_case/left"], wait)
    finish(out)


def dead_peer_case(backend: str, check: bool = True) -> dict:
    """Rank 1 dies; every other rank must get an error (not hang) within the op timeout."""
    comm, _ = setup(backend, check=check, oracle=False, timeout=8.0)
    comm.allreduce(torch.ones(2))
    if comm.rank == 1:
        os._exit(7)
    t0 = time.monotonic()
    try:
        comm.allreduce(torch.ones(1 << 16))
        comm.allreduce(torch.ones(1 << 16))
    except (PeerDiedError, CollectiveTimeoutError) as exc:
        print(f"DEADPEER-OK {type(exc).__name__} after {time.monotonic() - t0:.1f}s: {exc}", flush=True)
        os._exit(0)
    print("DEADPEER-FAIL no error", flush=True)
    os._exit(1)
