"""``shm``: our collectives for ranks on one host, over POSIX shared memory.

Every group maps one segment (see ``shm_segment``) holding, per rank, a control row
(a step counter, the op's fingerprint digest, where its buffer lives), two staging slots
(``DISTTRAIN_SHM_CHUNK_BYTES``, 4 MiB by default) and point-to-point mailboxes.

Synchronisation: each rank owns a monotonic step counter. An op's first step is its
*arrival*: the rank writes the op's fingerprint digest (and, for large ops, where its
tensor lives) into its row, then bumps its counter; "wait until every counter reaches s"
is the only primitive. Waiting spins briefly, then yields, then sleeps in growing steps
(two ranks may share two cores), and every few ms checks that the awaited peers are still
alive (a dead peer raises :class:`PeerDiedError`) and the deadline (a
:class:`CollectiveTimeoutError` names the ranks that never arrived and the sequence number).
Digests are compared right after arrival, so the cross-rank check rides on the op's own
synchronisation and costs one integer compare per peer (the digest covers what
``Fingerprint.digest()`` covers, with the non-``seq`` part cached); on a mismatch every rank publishes
its encoded :class:`Fingerprint` and raises ``mismatch_error`` naming both sides.

Algorithms: small messages (up to 128 KiB) are copied into the rank's staging slot and
every rank reduces all slots straight into its own tensor: one sync per op, no allocation,
numpy ufuncs on views made once (a third of torch's per-call overhead at 4 KiB).
Large ones split the work: rank r reduces part r of everybody's data (reduce-scatter),
then every rank copies the other parts (allgather), pipelined through the two staging
slots in chunks. Buffers from :meth:`ShmBackend.alloc` live in a shared segment, so large
ops on them skip staging: peers read each other's buffers in place (zero copy), which for
an allreduce is one read of N bytes plus a write of N bytes per rank, plus the reduction.
bfloat16/float16 sums, averages and products accumulate in float32 and round once.
Integer AVG truncates toward zero (like C integer division).

Order: ops run in the caller's thread and return a completed handle; with
``async_op=True`` they run, in issue order, on a per-communicator worker thread
(point-to-point sends and receives get a thread each, so a pair of async exchanges can't
deadlock). Memory ordering relies on x86's total store order (flags written after data).
"""

from __future__ import annotations

import collections
import itertools
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import ClassVar

import numpy as np
import torch

from ..env import DistEnv
from ..errors import (
    CollectiveMismatchError,
    CollectivesError,
    CollectiveTimeoutError,
    InvalidTensorError,
    PeerDiedError,
)
from ..fingerprint import ENCODED_SIZE, Fingerprint, mismatch_error
from ..types import CompletedWork, ReduceOp, Work
from .shm_segment import HEADER, Segment, job_tag, pid_alive, segment_nonce

try:
    import xxhash
except ImportError:  # pragma: no cover - a dependency of collectives.fingerprint
    xxhash = None

SMALL = int(os.environ.get("DISTTRAIN_SHM_SMALL_BYTES", 128 << 10))
SLOT = max(64 << 10, int(os.environ.get("DISTTRAIN_SHM_CHUNK_BYTES", 4 << 20)) // 4096 * 4096)
MBOX_SLOTS = 8


def _mbox_bytes(world: int) -> int:
    """Mailbox chunk per ordered pair: the ring (8 chunks) is world^2 sized, so shrink it for big groups."""
    return 256 << 10 if world <= 8 else 32 << 10


SPIN = 400  # polls before the first yield: about 100 microseconds
ROW = 16  # int64s per rank control row: [STEP, ERRSEQ, -, -, then per parity: DIG, NBYTES, ALLOC, OFFSET]
_STEP, _ERR, _PAR = 0, 1, 4
_LOWP = (torch.bfloat16, torch.float16)
_DONE = CompletedWork()
_NP = {
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.float16: np.float16,
    torch.int32: np.int32,
    torch.int64: np.int64,
}
_NPFN = {
    ReduceOp.SUM: np.add,
    ReduceOp.AVG: np.add,
    ReduceOp.MIN: np.minimum,
    ReduceOp.MAX: np.maximum,
    ReduceOp.PROD: np.multiply,
}
_worlds = itertools.count()  # world communicators built by this process (names must not repeat)


_digests: dict = {}


def _digest(fp: Fingerprint) -> int:
    """What ``fp.digest()`` covers (seq, op, group, shapes, dtype, extra), at a third of its cost: the
    hash of everything but ``seq`` is cached (a training loop repeats a few dozen calls), then mixed with
    ``seq``. Ranks run the same code, so equal fingerprints give equal digests on every rank."""
    key = (fp.op, fp.group, fp.shapes, fp.dtype, fp.extra)
    base = _digests.get(key)
    if base is None:
        if len(_digests) > 4096:
            _digests.clear()
        base = _digests[key] = xxhash.xxh64_intdigest(repr(key).encode())
    return ((base ^ (fp.seq * 0x9E3779B97F4A7C15)) & 0x7FFF_FFFF_FFFF_FFFF) or 1


def _align(n: int, a: int = 4096) -> int:
    return (n + a - 1) // a * a


def _u8(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _combine(srcs: list[torch.Tensor], out: torch.Tensor, op: ReduceOp, world: int) -> None:
    """out = reduce(srcs); ``out`` may be ``srcs[0]`` itself (never a later one)."""
    if out.dtype in _LOWP and op in (ReduceOp.SUM, ReduceOp.AVG, ReduceOp.PROD) and len(srcs) > 1:
        acc = srcs[0].float()
        for s in srcs[1:]:
            acc.mul_(s) if op is ReduceOp.PROD else acc.add_(s)
        if op is ReduceOp.AVG:
            acc.div_(world)
        out.copy_(acc)
        return
    fn = {
        ReduceOp.SUM: torch.add,
        ReduceOp.AVG: torch.add,
        ReduceOp.MIN: torch.minimum,
        ReduceOp.MAX: torch.maximum,
        ReduceOp.PROD: torch.mul,
    }[op]
    if len(srcs) == 1:
        if out is not srcs[0]:
            out.copy_(srcs[0])
    else:
        fn(srcs[0], srcs[1], out=out)
        for s in srcs[2:]:
            fn(out, s, out=out)
    if op is ReduceOp.AVG:
        _divide(out, world)


def _divide(t: torch.Tensor, world: int) -> None:
    if t.is_floating_point():
        t.div_(world)
    else:
        t.div_(world, rounding_mode="trunc")


def _reduce_rows(rows: torch.Tensor, out: torch.Tensor, op: ReduceOp, world: int) -> None:
    """out = reduce over dim 0 of ``rows`` ([world, n], not aliasing ``out``)."""
    if op in (ReduceOp.SUM, ReduceOp.AVG):
        if out.dtype in _LOWP:
            out.copy_(
                torch.sum(rows, 0, dtype=torch.float32).div_(world)
                if op is ReduceOp.AVG
                else torch.sum(rows, 0, dtype=torch.float32)
            )
            return
        torch.sum(rows, 0, dtype=out.dtype, out=out)
        if op is ReduceOp.AVG:
            _divide(out, world)
    elif op is ReduceOp.MIN:
        torch.amin(rows, 0, out=out)
    elif op is ReduceOp.MAX:
        torch.amax(rows, 0, out=out)
    elif out.dtype in _LOWP:
        out.copy_(torch.prod(rows, 0, dtype=torch.float32))
    else:
        torch.prod(rows, 0, dtype=out.dtype, out=out)


def _parts(n: int, world: int, unit: int = 16) -> list[tuple[int, int]]:
    """Split [0, n) into ``world`` contiguous parts, boundaries on multiples of ``unit``."""
    step = -(-n // world)
    step = -(-step // unit) * unit
    return [(min(n, r * step), min(n, (r + 1) * step)) for r in range(world)]


class _Work:
    def __init__(self):
        self._event, self.error = threading.Event(), None

    def wait(self, timeout: float | None = None) -> None:
        if not self._event.wait(timeout):
            raise CollectiveTimeoutError(f"shm async op did not complete within {timeout}s")
        if self.error is not None:
            raise self.error

    def is_completed(self) -> bool:
        return self._event.is_set()


class _Worker:
    """A daemon thread running submitted ops in order; started on first use."""

    def __init__(self, name: str):
        self._name, self._queue, self._cv = name, collections.deque(), threading.Condition()
        self._thread: threading.Thread | None = None
        self._last: _Work | None = None

    def submit(self, fn: Callable[[], None]) -> _Work:
        work = _Work()
        with self._cv:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
            self._queue.append((fn, work))
            self._last = work
            self._cv.notify()
        return work

    def drain(self) -> None:
        last = self._last
        if last is not None:
            last._event.wait()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue:
                    self._cv.wait()
                fn, work = self._queue.popleft()
            if fn is None:
                work._event.set()
                return
            try:
                fn()
            except BaseException as exc:  # surfaced by wait()
                work.error = exc
            work._event.set()

    def stop(self) -> None:
        if self._thread is not None:
            self.submit(None).wait(5.0)


class _Alloc:
    """A collective allocation: one segment, one equal slice per rank."""

    def __init__(self, ident: int, seg: Segment, stride: int, nbytes: int, rank: int):
        self.id, self.seg, self.stride = ident, seg, stride
        self.u8 = torch.frombuffer(seg.mm, dtype=torch.uint8)
        base = self.u8.data_ptr()
        self.lo = base + HEADER + rank * stride
        self.hi = self.lo + nbytes

    def peer(self, rank: int, offset: int, nbytes: int) -> torch.Tensor:
        start = HEADER + rank * self.stride + offset
        return self.u8[start : start + nbytes]


class ShmBackend:
    """Collectives over one shared segment per group. Build with :meth:`create` (all ranks)."""

    name: ClassVar[str] = "shm"
    checks_inline: ClassVar[bool] = True

    def __init__(
        self, seg: Segment, rank: int, world: int, timeout: float, where: str, group: str, global_ranks: Sequence[int]
    ):
        self.rank, self.world_size, self.timeout = rank, world, timeout
        self._seg, self._where, self._group, self._global = seg, where, group, list(global_ranks)
        self._q, W = seg.q, world
        self._row = [(HEADER + r * ROW * 8) // 8 for r in range(W)]
        self._me = self._row[rank]
        self._peers = [self._row[r] for r in range(W) if r != rank]
        blob_off = _align(HEADER + W * ROW * 8)
        self._blob_off = blob_off
        p2p_off = _align(blob_off + W * ENCODED_SIZE)
        self._pair = lambda s, d: (p2p_off + 512 * (s * W + d)) // 8
        stage_off = _align(p2p_off + 512 * W * W)
        mbox_off = stage_off + W * 2 * SLOT
        self._mbox_off = mbox_off
        self._mb = _mbox_bytes(W)
        u8 = torch.frombuffer(seg.mm, dtype=torch.uint8)
        self._u8 = u8
        self._stage = u8[stage_off:mbox_off].view(W, 2, SLOT)
        self._typed: dict = {}
        self._step = 0  # this rank's counter; every rank's moves in lockstep op by op
        self._seq = 0  # collectives issued (parity picks the control-row half)
        self._use = 0  # staging rounds issued (parity picks the slot)
        self._sent = [0] * W
        self._taken = [0] * W
        self._allocs: dict[int, _Alloc] = {}
        self._alloc_ids = itertools.count(1)
        self._subgroups = 0
        self._workers: dict[str, _Worker] = {}
        self._closed = False
        self._broken: str | None = None  # after a timeout or a dead peer the ranks are out of step for good
        self._op_timeout = timeout
        self._spin = SPIN

    @staticmethod
    def segment_bytes(world: int) -> int:
        fixed = _align(_align(_align(HEADER + world * ROW * 8) + world * ENCODED_SIZE) + 512 * world * world)
        return fixed + world * 2 * SLOT + world * world * MBOX_SLOTS * _mbox_bytes(world)

    # -- construction ------------------------------------------------------------------
    @classmethod
    def is_available(cls) -> bool:
        return os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK)

    @classmethod
    def create(cls, env: DistEnv, store=None, timeout: float = 300.0, device: str = "cpu") -> ShmBackend:
        """Every rank calls it once. With ``store``, rank 0 announces a random segment name through it;
        without, the name derives from the job secret and id (see ``shm_segment.job_tag``). Returns
        once this rank has mapped it (peers are awaited by the first op)."""
        if not device.startswith("cpu"):
            raise InvalidTensorError(
                f"rank {env.where}: the shm backend moves CPU tensors only, got device {device!r}"
                "\nHINT: use backend='nccl' for CUDA tensors"
            )
        if env.local_world_size != env.world_size:
            raise CollectivesError(
                f"rank {env.where}: shm needs every rank on one host, but LOCAL_WORLD_SIZE={env.local_world_size} "
                f"!= WORLD_SIZE={env.world_size}\nHINT: use backend='mpi' or 'torch' across hosts"
            )
        gen = next(_worlds)
        tag = job_tag()
        if store is not None:  # rank 0 announces a name nobody else can predict (shm_segment)
            key = f"collectives/shm/world{gen}"
            if env.rank == 0:
                name = f"disttrain-{segment_nonce()}-w{gen}"
                store.set(key, name)
            else:
                name = store.get(key).decode()
        elif tag is not None:  # every rank derives the same name from the job's secret or id
            name = f"disttrain-{tag}-w{gen}"
        elif env.world_size == 1:
            name = f"disttrain-solo{os.getpid()}-w{gen}"
        else:
            raise CollectivesError(
                f"rank {env.where}: the shm backend cannot name its segment: no DISTTRAIN_JOB_ID, "
                "SLURM or MPI job id in the environment and no store\nHINT: set DISTTRAIN_JOB_ID to the same value "
                "on every rank, or pass a store to collectives.init"
            )
        seg = Segment.open(name, env.rank, env.world_size, cls.segment_bytes(env.world_size), timeout, where=env.where)
        return cls(seg, env.rank, env.world_size, timeout, env.where, "world", range(env.world_size))

    def new_group(self, ranks: Sequence[int]) -> ShmBackend | None:
        """Every rank of this group calls it with the same ``ranks``; members map a new segment."""
        self._drain_all()
        ranks = sorted(ranks)
        self._subgroups += 1
        if any(not 0 <= r < self.world_size for r in ranks) or len(set(ranks)) != len(ranks):
            raise CollectivesError(
                f"rank {self._where}: new_group ranks {ranks} invalid for group of size {self.world_size}"
            )
        if self.rank not in ranks:
            return None
        name = f"{self._seg.name}.g{self._subgroups}"
        me = ranks.index(self.rank)
        seg = Segment.open(
            name,
            me,
            len(ranks),
            self.segment_bytes(len(ranks)),
            self.timeout,
            creator_pid=self._seg.pid(ranks[0]) or None,
            where=self._where,
        )
        group = f"{self._group}/{','.join(map(str, ranks))}"
        return ShmBackend(seg, me, len(ranks), self.timeout, self._where, group, [self._global[r] for r in ranks])

    def alloc(self, shape: Sequence[int] | int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A tensor in a segment every rank of the group maps, so large ops on it need no copies.

        Collective: every rank of the group calls it in the same order with the same shape and dtype.
        The memory lives as long as the returned tensor (or a view of it) does.
        """
        self._drain_all()
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        stride = _align(nbytes)
        ident = next(self._alloc_ids)
        seg = Segment.open(
            f"{self._seg.name}.a{ident}",
            self.rank,
            self.world_size,
            HEADER + stride * self.world_size,
            self.timeout,
            creator_pid=self._seg.pid(0) or None,
            where=self._where,
        )
        a = _Alloc(ident, seg, stride, nbytes, self.rank)
        self._allocs[ident] = a
        tensor = a.peer(self.rank, 0, nbytes).view(dtype).view(shape)
        # When the caller drops the tensor, forget the alloc: this rank then reports its views as plain
        # (every rank must report the same alloc for zero-copy, so the group falls back consistently),
        # and the memory goes with the last view.
        weakref.finalize(tensor, self._allocs.pop, ident, None)
        return tensor

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for w in self._workers.values():
            w.stop()
        self._stage = self._u8 = self._typed = None
        self._seg.close()
        for a in list(self._allocs.values()):
            a.seg.maybe_unlink()

    # -- synchronisation -----------------------------------------------------------------
    def _arrive(self, fp: Fingerprint | None, nbytes: int = 0, where: tuple[int, int] = (0, 0)) -> int:
        """Publish this rank's op record, bump the step, wait for all, compare digests. Returns the parity."""
        q, par = self._q, _PAR + 4 * (self._seq & 1)
        me = self._me + par
        digest = _digest(fp) if fp is not None else 0
        q[me], q[me + 1], q[me + 2], q[me + 3] = digest, nbytes, where[0], where[1]
        self._step += 1
        q[self._me] = self._step
        self._seq += 1  # now, not after the op: a rank leaving by a mismatch error must not reuse this half
        self._wait(self._step, fp)
        if digest:
            for p in self._peers:
                other = q[p + par]
                if other != digest and other:
                    self._mismatch(fp, p)
        return par

    def _sync(self, fp: Fingerprint | None = None) -> None:
        self._step += 1
        self._q[self._me] = self._step
        self._wait(self._step, fp)

    def _wait(self, target: int, fp: Fingerprint | None) -> None:
        q = self._q
        pending = [p for p in self._peers if q[p] < target]
        n = 0
        while pending:
            n += 1
            if n > self._spin:
                return self._slow_wait(target, pending, fp)
            pending = [p for p in pending if q[p] < target]

    def _slow_wait(self, target: int, pending: list[int], fp: Fingerprint | None) -> None:
        q = self._q
        start = time.monotonic()
        deadline, check, delay = start + self._op_timeout, start, 0.0
        while True:
            pending = [p for p in pending if q[p] < target]
            if not pending:
                return
            if delay:
                time.sleep(delay)
            else:
                os.sched_yield()
            now = time.monotonic()
            if now - start > 2e-3:
                delay = min(max(delay * 1.5, 2e-5), 1e-3)
            if now - check > 5e-3:
                check = now
                self._check_alive(pending, fp)
                if now > deadline:
                    self._seg.maybe_unlink()  # a rank that never attached can't remove our name
                    missing = ", ".join(str(self._global[self._rank_of(p)]) for p in pending)
                    self._broken = f"timeout in {self._what(fp)}"
                    raise CollectiveTimeoutError(
                        f"rank {self._where}: shm {self._what(fp)} in group {self._group!r} timed out after "
                        f"{self._op_timeout:g}s; ranks that never arrived: {missing}\nHINT: a rank is stuck "
                        "or skipped this collective (rank-dependent branch?); raise timeout= for slow steps"
                    )

    def _rank_of(self, row: int) -> int:
        return self._row.index(row)

    def _what(self, fp: Fingerprint | None) -> str:
        return f"{fp.op}#{fp.seq} ({fp.site})" if fp is not None else f"collective #{self._seq}"

    def _check_alive(self, rows_or_ranks: list[int], fp: Fingerprint | None, rows: bool = True) -> None:
        for x in rows_or_ranks:
            r = self._rank_of(x) if rows else x
            pid = self._seg.pid(r)
            if not pid_alive(pid):
                self._seg.maybe_unlink()
                self._broken = f"group rank {r} died"
                raise PeerDiedError(
                    f"rank {self._where}: group rank {r} (global rank {self._global[r]}, pid {pid}) died during "
                    f"shm {self._what(fp)} in group {self._group!r}\nHINT: see that rank's log for the root cause"
                )

    def _mismatch(self, fp: Fingerprint, peer_row: int) -> None:
        q, r = self._q, self.rank
        off = self._blob_off + r * ENCODED_SIZE
        self._seg.mm[off : off + ENCODED_SIZE] = fp.encode()
        q[self._me + _ERR] = self._step
        peer = self._rank_of(peer_row)
        deadline = time.monotonic() + min(self.timeout, 10.0)
        while q[peer_row + _ERR] != self._step:
            if time.monotonic() > deadline:
                raise CollectiveMismatchError(
                    f"collective mismatch in group {self._group!r}: {fp.describe()}, but group rank {peer} "
                    "called something else (its fingerprint was not published; are checks off there?)"
                )
            self._check_alive([peer], fp, rows=False)
            time.sleep(1e-3)
        off = self._blob_off + peer * ENCODED_SIZE
        raise mismatch_error(fp, Fingerprint.decode(self._seg.mm[off : off + ENCODED_SIZE]))

    def _zero_copy_peers(self, par: int) -> list[int] | None:
        """Offsets of every rank's tensor in one shared alloc, or None when some rank's isn't in it."""
        q = self._q
        ident = q[self._me + par + 2]
        if not ident or any(q[row + par + 2] != ident for row in self._row):
            return None
        return [q[row + par + 3] for row in self._row]

    def _where_is(self, tensors: Sequence[torch.Tensor]) -> tuple[int, int]:
        """(alloc id, byte offset) when ``tensors`` lie back to back in this rank's slice of an alloc."""
        if not self._allocs or not tensors:
            return (0, 0)
        ptr = tensors[0].data_ptr()
        end = ptr
        for t in tensors:
            if t.data_ptr() != end:
                return (0, 0)
            end += t.numel() * t.element_size()
        for a in self._allocs.values():
            if a.lo <= ptr and end <= a.hi:
                return (a.id, ptr - a.lo)
        return (0, 0)

    def _rows(self, slot: int, dtype: torch.dtype) -> torch.Tensor:
        key = (slot, dtype)
        rows = self._typed.get(key)
        if rows is None:
            rows = self._typed[key] = self._stage[:, slot, :].view(dtype)
        return rows

    def _np_rows(self, slot: int, dtype: torch.dtype) -> np.ndarray:
        key = (slot, dtype, "np")
        rows = self._typed.get(key)
        if rows is None:
            rows = self._typed[key] = self._stage[:, slot, :].numpy().view(_NP[dtype])
        return rows

    def _next_slot(self) -> int:
        self._use += 1
        return self._use & 1

    # -- dispatch ------------------------------------------------------------------------
    def _run(self, kind: str, fn: Callable[..., None], args: tuple, timeout: float | None, async_op: bool) -> Work:
        if self._closed:
            raise CollectivesError(f"rank {self._where}: shm communicator of group {self._group!r} is closed")
        if self._broken:
            raise CollectivesError(
                f"rank {self._where}: shm communicator of group {self._group!r} is unusable after "
                f"an earlier error: {self._broken}\nHINT: the job must restart (or rebuild the group)"
            )
        timeout = self.timeout if timeout is None else timeout
        worker = self._workers.get(kind)
        if async_op:
            if worker is None:
                worker = self._workers[kind] = _Worker(f"shm-{kind}-{self._group}")
            return worker.submit(lambda: self._timed(kind, timeout, fn, args, 8))
        if worker is not None:
            worker.drain()
        self._timed(kind, timeout, fn, args, SPIN)
        return _DONE

    def _timed(self, kind: str, timeout: float, fn: Callable[..., None], args: tuple, spin: int) -> None:
        if kind == "coll":  # collectives run one at a time; p2p waits take their timeout as an argument
            # A worker thread hardly spins: spinning Python holds the GIL the caller's backward pass wants.
            self._op_timeout, self._spin = timeout, spin
            fn(*args)
        else:
            fn(*args, timeout)

    def _drain_all(self) -> None:
        for w in self._workers.values():
            w.drain()

    # -- collectives -------------------------------------------------------------------------
    def allreduce(
        self,
        tensor: torch.Tensor,
        op: ReduceOp,
        *,
        fingerprint: Fingerprint | None = None,
        async_op: bool = False,
        timeout: float | None = None,
    ) -> Work:
        if type(op) is not ReduceOp:
            op = ReduceOp(op)
        if async_op or self._workers or self._closed or self._broken:
            return self._run("coll", self._allreduce, (tensor, op, fingerprint), timeout, async_op)
        self._op_timeout, self._spin = (self.timeout if timeout is None else timeout), SPIN
        self._allreduce(tensor, op, fingerprint)  # the sync fast path: no closure, no thread
        return _DONE

    def _allreduce(self, t: torch.Tensor, op: ReduceOp, fp) -> None:
        W, nb = self.world_size, t.nbytes
        if W == 1:
            self._arrive(fp, nb)
            return
        if nb <= SMALL and t.dtype in _NP and (W == 2 or t.dtype is not torch.float16):
            # Latency path in numpy (a third of torch's per-call overhead); fp16 pairs round once either way.
            a = (t.detach() if t.requires_grad else t).numpy()
            if a.ndim != 1:
                a = a.reshape(-1)
            n = a.shape[0]
            slot = self._next_slot()
            rows = self._np_rows(slot, t.dtype)
            rows[self.rank, :n] = a
            self._arrive(fp, nb)
            fn = _NPFN[op]
            if W == 2:
                fn(rows[0, :n], rows[1, :n], out=a)
            else:
                fn.reduce(rows[:, :n], axis=0, out=a)
            if op is ReduceOp.AVG:
                np.divide(a, W, out=a)
            return
        flat = t.view(-1)
        if nb <= SMALL:
            slot = self._next_slot()
            rows = self._rows(slot, t.dtype)
            n = flat.numel()
            rows[self.rank, :n].copy_(flat)
            self._arrive(fp, nb)
            _reduce_rows(rows[:, :n], flat, op, W)
            return
        par = self._arrive(fp, nb, self._where_is([t]))
        offsets = self._zero_copy_peers(par)
        if offsets is not None:
            a = self._allocs[self._q[self._me + par + 2]]
            views = [a.peer(j, offsets[j], nb).view(t.dtype) for j in range(W)]
            parts = _parts(flat.numel(), W)
            lo, hi = parts[self.rank]
            mine = views[self.rank]
            _combine([mine[lo:hi]] + [views[j][lo:hi] for j in range(W) if j != self.rank], mine[lo:hi], op, W)
            self._sync(fp)
            for j, (a_, b_) in enumerate(parts):
                if j != self.rank and b_ > a_:
                    mine[a_:b_].copy_(views[j][a_:b_])
            self._sync(fp)  # peers may still read our part: don't return (and let the caller write) before
            return
        es = t.element_size()
        chunk = SLOT // es
        for start in range(0, flat.numel(), chunk):
            piece = flat[start : start + chunk]
            n = piece.numel()
            slot = self._next_slot()
            rows = self._rows(slot, t.dtype)
            rows[self.rank, :n].copy_(piece)
            self._sync(fp)
            parts = _parts(n, W)
            lo, hi = parts[self.rank]
            if hi > lo:
                _combine(
                    [rows[self.rank, lo:hi]] + [rows[j, lo:hi] for j in range(W) if j != self.rank],
                    rows[self.rank, lo:hi],
                    op,
                    W,
                )
            self._sync(fp)
            for j, (a_, b_) in enumerate(parts):
                if b_ > a_:
                    piece[a_:b_].copy_(rows[j, a_:b_])

    def broadcast(
        self,
        tensor: torch.Tensor,
        src: int,
        *,
        fingerprint: Fingerprint | None = None,
        async_op: bool = False,
        timeout: float | None = None,
    ) -> Work:
        return self._run("coll", self._broadcast, (tensor, src, fingerprint), timeout, async_op)

    def _broadcast(self, t: torch.Tensor, src: int, fp) -> None:
        nb, root = t.numel() * t.element_size(), self.rank == src
        data = _u8(t)
        if nb <= SLOT:
            slot = self._next_slot()
            if root:
                self._stage[src, slot, :nb].copy_(data)
            self._arrive(fp, nb)
            if not root:
                data.copy_(self._stage[src, slot, :nb])
            return
        par = self._arrive(fp, nb, self._where_is([t]))
        offsets = self._zero_copy_peers(par)
        if offsets is not None:
            if not root:
                data.copy_(self._allocs[self._q[self._me + par + 2]].peer(src, offsets[src], nb))
            self._sync(fp)
            return
        for start in range(0, nb, SLOT):
            n = min(SLOT, nb - start)
            slot = self._next_slot()
            if root:
                self._stage[src, slot, :n].copy_(data[start : start + n])
            self._sync(fp)
            if not root:
                data[start : start + n].copy_(self._stage[src, slot, :n])

    def allgather(
        self,
        outputs: Sequence[torch.Tensor],
        tensor: torch.Tensor,
        *,
        fingerprint: Fingerprint | None = None,
        async_op: bool = False,
        timeout: float | None = None,
    ) -> Work:
        if len(outputs) != self.world_size:
            raise InvalidTensorError(
                f"rank {self._where}: allgather needs {self.world_size} outputs, got {len(outputs)}"
            )
        return self._run("coll", self._allgather, (list(outputs), tensor, fingerprint), timeout, async_op)

    def _allgather(self, outputs: list[torch.Tensor], t: torch.Tensor, fp) -> None:
        W, r = self.world_size, self.rank
        outs = [_u8(o) for o in outputs]
        sizes = [o.numel() for o in outs]
        data = _u8(t)
        if data.numel() != sizes[r]:
            raise InvalidTensorError(
                f"rank {self._where}: allgather output {r} has {sizes[r]} bytes but the input has {data.numel()}"
            )
        big = max(sizes)
        if big <= SLOT:
            slot = self._next_slot()
            self._stage[r, slot, : sizes[r]].copy_(data)
            self._arrive(fp, big)
            for j in range(W):
                outs[j].copy_(data if j == r else self._stage[j, slot, : sizes[j]])
            return
        par = self._arrive(fp, big, self._where_is([t]))
        offsets = self._zero_copy_peers(par)
        if offsets is not None:
            a = self._allocs[self._q[self._me + par + 2]]
            for j in range(W):
                outs[j].copy_(data if j == r else a.peer(j, offsets[j], sizes[j]))
            self._sync(fp)
            return
        outs[r].copy_(data)
        for start in range(0, big, SLOT):
            slot = self._next_slot()
            mine = data[start : start + SLOT]
            self._stage[r, slot, : mine.numel()].copy_(mine)
            self._sync(fp)
            for j in range(W):
                if j != r and sizes[j] > start:
                    n = min(SLOT, sizes[j] - start)
                    outs[j][start : start + n].copy_(self._stage[j, slot, :n])

    def reduce_scatter(
        self,
        output: torch.Tensor,
        inputs: Sequence[torch.Tensor],
        op: ReduceOp,
        *,
        fingerprint: Fingerprint | None = None,
        async_op: bool = False,
        timeout: float | None = None,
    ) -> Work:
        if len(inputs) != self.world_size:
            raise InvalidTensorError(
                f"rank {self._where}: reduce_scatter needs {self.world_size} inputs, got {len(inputs)}"
            )
        if inputs[self.rank].numel() != output.numel() or any(i.dtype != output.dtype for i in inputs):
            raise InvalidTensorError(
                f"rank {self._where}: reduce_scatter output ({output.numel()} x {output.dtype}) "
                f"must match inputs[{self.rank}] in size and every input in dtype"
            )
        return self._run(
            "coll", self._reduce_scatter, (output, list(inputs), ReduceOp(op), fingerprint), timeout, async_op
        )

    def _reduce_scatter(self, out: torch.Tensor, inputs: list[torch.Tensor], op: ReduceOp, fp) -> None:
        W, r, es = self.world_size, self.rank, out.element_size()
        counts = [i.numel() for i in inputs]
        total = sum(counts)
        my_lo = sum(counts[:r])
        my_hi = my_lo + counts[r]
        flat_out = out.view(-1)
        par = self._arrive(fp, total * es, self._where_is(inputs) if total * es > SMALL else (0, 0))
        offsets = self._zero_copy_peers(par)
        if offsets is not None:
            a = self._allocs[self._q[self._me + par + 2]]
            lo, n = my_lo * es, counts[r] * es
            srcs = [a.peer(j, offsets[j] + lo, n).view(out.dtype) for j in range(W)]
            _combine([srcs[r]] + [s for j, s in enumerate(srcs) if j != r], flat_out, op, W) if n else None
            self._sync(fp)
            return
        chunk = SLOT // es
        for start in range(0, total, chunk):
            end = min(total, start + chunk)
            slot = self._next_slot()
            rows = self._rows(slot, out.dtype)
            pos = 0
            for t in inputs:  # copy the part of the concatenation that falls in [start, end)
                a_, b_ = max(pos, start), min(pos + t.numel(), end)
                if b_ > a_:
                    rows[r, a_ - start : b_ - start].copy_(t.view(-1)[a_ - pos : b_ - pos])
                pos += t.numel()
            self._sync(fp)
            a_, b_ = max(my_lo, start), min(my_hi, end)
            if b_ > a_:
                _reduce_rows(rows[:, a_ - start : b_ - start], flat_out[a_ - my_lo : b_ - my_lo], op, W)

    def all_to_all(
        self,
        outputs: Sequence[torch.Tensor],
        inputs: Sequence[torch.Tensor],
        *,
        fingerprint: Fingerprint | None = None,
        async_op: bool = False,
        timeout: float | None = None,
    ) -> Work:
        if len(outputs) != self.world_size or len(inputs) != self.world_size:
            raise InvalidTensorError(f"rank {self._where}: all_to_all needs {self.world_size} inputs and outputs")
        return self._run("coll", self._all_to_all, (list(outputs), list(inputs), fingerprint), timeout, async_op)

    def _all_to_all(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], fp) -> None:
        W, r = self.world_size, self.rank
        ins, outs = [_u8(i) for i in inputs], [_u8(o) for o in outputs]
        outs[r].copy_(ins[r])
        par = self._arrive(fp, max(x.numel() for x in ins + outs))
        q = self._q
        big = max(q[row + par + 1] for row in self._row)
        sub = SLOT // W // 64 * 64
        for start in range(0, big, sub):
            slot = self._next_slot()
            for j in range(W):
                piece = ins[j][start : start + sub]
                if j != r and piece.numel():
                    self._stage[r, slot, j * sub : j * sub + piece.numel()].copy_(piece)
            self._sync(fp)
            for j in range(W):
                piece = outs[j][start : start + sub]
                if j != r and piece.numel():
                    piece.copy_(self._stage[j, slot, r * sub : r * sub + piece.numel()])

    def barrier(
        self, *, fingerprint: Fingerprint | None = None, async_op: bool = False, timeout: float | None = None
    ) -> Work:
        return self._run("coll", self._barrier, (fingerprint,), timeout, async_op)

    def _barrier(self, fp) -> None:
        self._arrive(fp)

    # -- point to point ----------------------------------------------------------------------
    # Pair (src, dst) owns a ring of MBOX_SLOTS chunks of _mbox_bytes(world). Counters: SENT (written by src),
    # TAKEN (by dst); per slot: tag, message bytes, dtype, fingerprint digest (send and recv digests agree). A send completes once its last chunk is in
    # the ring (buffered up to 2 MiB per pair), so a matching recv needn't be posted yet.
    def send(
        self,
        tensor: torch.Tensor,
        dst: int,
        tag: int,
        *,
        fingerprint: Fingerprint | None = None,
        async_op: bool = False,
        timeout: float | None = None,
    ) -> Work:
        self._peer_ok(dst, "send")
        return self._run("send", self._send, (tensor, dst, tag, fingerprint), timeout, async_op)

    def recv(
        self,
        tensor: torch.Tensor,
        src: int,
        tag: int,
        *,
        fingerprint: Fingerprint | None = None,
        async_op: bool = False,
        timeout: float | None = None,
    ) -> Work:
        self._peer_ok(src, "recv")
        return self._run("recv", self._recv, (tensor, src, tag, fingerprint), timeout, async_op)

    def _peer_ok(self, peer: int, what: str) -> None:
        if not 0 <= peer < self.world_size:
            raise InvalidTensorError(f"rank {self._where}: {what} peer {peer} outside group of size {self.world_size}")

    def _mbox(self, src: int, dst: int, slot: int, n: int) -> torch.Tensor:
        off = self._mbox_off + ((src * self.world_size + dst) * MBOX_SLOTS + slot) * self._mb
        return self._u8[off : off + n]

    def _send(self, t: torch.Tensor, dst: int, tag: int, fp, timeout: float) -> None:
        q, base, data = self._q, self._pair(self.rank, dst), _u8(t)
        nb = data.numel()
        for start in range(0, max(nb, 1), self._mb):
            idx = self._sent[dst]
            self._p2p_wait(lambda idx=idx: idx - q[base + 1] < MBOX_SLOTS, dst, fp, "send to", tag, timeout)
            slot = idx % MBOX_SLOTS
            piece = data[start : start + self._mb]
            self._mbox(self.rank, dst, slot, piece.numel()).copy_(piece)
            m = base + 2 + 4 * slot
            q[m], q[m + 1], q[m + 2], q[m + 3] = tag, nb, _DTYPES.index(t.dtype), _digest(fp) if fp else 0
            self._sent[dst] = idx + 1
            q[base] = idx + 1

    def _recv(self, t: torch.Tensor, src: int, tag: int, fp, timeout: float) -> None:
        q, base, data = self._q, self._pair(src, self.rank), _u8(t)
        nb = data.numel()
        for start in range(0, max(nb, 1), self._mb):
            idx = self._taken[src]
            self._p2p_wait(lambda idx=idx: q[base] > idx, src, fp, "recv from", tag, timeout)
            slot = idx % MBOX_SLOTS
            m = base + 2 + 4 * slot
            digest = _digest(fp) if fp is not None and start == 0 else 0
            if start == 0 and (
                q[m] != tag
                or q[m + 1] != nb
                or q[m + 2] != _DTYPES.index(t.dtype)
                or (digest and q[m + 3] and q[m + 3] != digest)
            ):
                mine = fp.describe() if fp is not None else f"tag {tag}, {nb} bytes of {t.dtype}"
                raise CollectiveMismatchError(
                    f"rank {self._where}: point-to-point mismatch in group {self._group!r}:\n  recv {mine}\n"
                    f"  but the next message from group rank {src} has tag {q[m]}, {q[m + 1]} bytes of "
                    f"{_DTYPES[q[m + 2]]}\nHINT: messages between a pair of ranks are matched in order; post "
                    "receives in send order, with the same shape and dtype"
                )
            piece = data[start : start + self._mb]
            piece.copy_(self._mbox(src, self.rank, slot, piece.numel()))
            self._taken[src] = idx + 1
            q[base + 1] = idx + 1

    def _p2p_wait(self, ready: Callable[[], bool], peer: int, fp, what: str, tag: int, timeout: float) -> None:
        for _ in range(SPIN if threading.current_thread() is threading.main_thread() else 8):
            if ready():
                return
        start = time.monotonic()
        check = start
        while not ready():
            now = time.monotonic()
            time.sleep(0 if now - start < 2e-3 else 2e-4)
            if now - check > 5e-3:
                check = now
                self._check_alive([peer], fp, rows=False)
                if now - start > timeout:
                    raise CollectiveTimeoutError(
                        f"rank {self._where}: shm {what} group rank {peer} (tag {tag}) timed out after "
                        f"{timeout:g}s in group {self._group!r}\nHINT: the peer never posted the matching op"
                    )


_DTYPES = [
    torch.float32,
    torch.float64,
    torch.bfloat16,
    torch.float16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.bool,
]
