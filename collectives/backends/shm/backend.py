"""``shm``: our collectives for ranks on one host, over POSIX shared memory.

Every group maps one segment (``segment``: naming, publish, attach, cleanup) whose
regions are laid out by ``layout``: per rank a control row, two staging slots and
point-to-point mailboxes. The concepts live in siblings, each readable alone:

* ``sync``: step counters, the wait, dead-peer and timeout detection, and the
  cross-rank check riding on the op's own synchronisation (one integer compare per peer);
* ``algorithms``: latency, staged and zero-copy paths of every collective;
* ``kernels``: the reductions (half types accumulate in float32);
* ``alloc``: ``alloc``'d tensors in a shared segment, for zero-copy ops;
* ``p2p``: mailboxes for send/recv;
* ``worker_thread``: the thread async ops run on.

This module is the backend itself: construction, groups, dispatch. Ops run in the
caller's thread and return a completed handle; with ``async_op=True`` they run, in issue
order, on a per-group worker thread (sends and receives get a thread each, so a pair of
async exchanges can't deadlock).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch

from ...abort import AbortSignal
from ...backend import AbortableBackend, InlineCheckingBackend
from ...env import DistEnv
from ...errors import CollectivesError, InvalidTensorError
from ...fingerprint import Fingerprint
from ...types import CompletedWork, ReduceOp, Work
from ..worker_thread import WorkerThread
from .algorithms import Algorithms
from .alloc import AllocTable
from .layout import Layout
from .p2p import Mailboxes
from .segment import Segment, job_tag, segment_nonce
from .sync import WORKER_SPIN, StepSync

_DONE = CompletedWork()
_worlds = itertools.count()  # storeless world communicators built by this process (names must not repeat)


class ShmBackend(InlineCheckingBackend, AbortableBackend):
    """Collectives over one shared segment per group. Build with :meth:`create` (all ranks)."""

    name: ClassVar[str] = "shm"

    def __init__(
        self,
        seg: Segment,
        rank: int,
        world: int,
        timeout: float,
        where: str,
        group: str,
        global_ranks: Sequence[int],
        signal: AbortSignal | None = None,
    ):
        self.rank, self.world_size, self.timeout = rank, world, timeout
        self._seg, self._where, self._group, self._global = seg, where, group, list(global_ranks)
        layout = Layout.for_world(world)
        u8 = torch.frombuffer(seg.mm, dtype=torch.uint8)
        self._sync = StepSync(seg, layout, rank, timeout, where, group, global_ranks, u8.data_ptr(), signal)
        self._children: list[ShmBackend] = []  # subgroups: an abort poisons their segments too
        self._allocs = AllocTable()
        self._algo = Algorithms(self._sync, layout, u8, self._allocs)
        self._mail = Mailboxes(self._sync, layout, u8)
        self._subgroups = 0
        self._workers: dict[str, WorkerThread] = {}
        self._closed = False

    @staticmethod
    def segment_bytes(world: int) -> int:
        return Layout.for_world(world).total

    # -- construction ------------------------------------------------------------------
    @classmethod
    def is_available(cls) -> bool:
        return os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK)

    @classmethod
    def create(cls, env: DistEnv, store=None, timeout: float = 300.0, device: str = "cpu") -> ShmBackend:
        """Every rank calls it once. With ``store``, rank 0 announces a random segment name through it;
        without, the name derives from the job secret and id (see ``segment.job_tag``). Returns
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
        tag = job_tag()
        if store is not None:  # rank 0 announces a name nobody else can predict (segment)
            # The k-th shm world this rank builds over this store, counted in the store: a rank
            # that joins late (an elastic world, its own store prefix) and one that built other
            # worlds before agree on k, where a count per process would not.
            gen = store.add(f"collectives/shm/built/{env.rank}", 1)
            key = f"collectives/shm/world{gen}"
            if env.rank == 0:
                name = f"disttrain-{segment_nonce()}-w{gen}"
                store.set(key, name)
            else:
                name = store.get(key).decode()
        elif tag is not None:  # every rank derives the same name from the job's secret or id
            gen = next(_worlds)
            name = f"disttrain-{tag}-w{gen}"
        elif env.world_size == 1:
            gen = next(_worlds)
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
        sub = ShmBackend(
            seg, me, len(ranks), self.timeout, self._where, group, [self._global[r] for r in ranks], self._sync.signal
        )
        self._children.append(sub)
        return sub

    def watch_aborts(self) -> None:
        """Nothing to arm: every wait past its spin checks for an abort."""

    def abort(self, reason: str) -> None:
        """Any thread: pending and later ops of this group and its subgroups, here and (through the
        poison in each segment) on every peer, raise CollectiveAbortedError within milliseconds."""
        self._sync.signal.set(reason)
        self._poison()

    def _poison(self) -> None:
        if not self._closed:
            self._sync.broken = self._sync.broken or f"aborted: {self._sync.signal.reason}"  # no inline fast path
            self._sync.poison()
        for sub in self._children:
            sub._poison()

    def alloc(self, shape: Sequence[int] | int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A tensor in a segment every rank of the group maps, so large ops on it need no copies.

        Collective: every rank of the group calls it in the same order with the same shape and dtype.
        The memory lives as long as the returned tensor (or a view of it) does.
        """
        self._drain_all()
        return self._allocs.new(self._seg, self.rank, self.world_size, shape, dtype, self.timeout, self._where)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for w in self._workers.values():
            w.stop()
        self._algo.close()
        self._seg.close()
        self._allocs.unlink_all()

    # -- dispatch ------------------------------------------------------------------------
    def _run(self, kind: str, fn: Callable[..., None], args: tuple, timeout: float | None, async_op: bool) -> Work:
        if self._closed:
            raise CollectivesError(f"rank {self._where}: shm communicator of group {self._group!r} is closed")
        self._sync.signal.check(self._where, f"shm group {self._group!r}")
        if self._sync.broken:
            raise CollectivesError(
                f"rank {self._where}: shm communicator of group {self._group!r} is unusable after "
                f"an earlier error: {self._sync.broken}\nHINT: the job must restart (or rebuild the group)"
            )
        timeout = self.timeout if timeout is None else timeout
        worker = self._workers.get(kind)
        if async_op:
            if worker is None:
                worker = self._workers[kind] = WorkerThread(f"shm-{kind}-{self._group}")
            return worker.submit(lambda: self._timed(kind, timeout, fn, args, WORKER_SPIN))
        if worker is not None:
            worker.drain()
        self._timed(kind, timeout, fn, args, self._sync.full_spin)
        return _DONE

    def _coll(self, fn: Callable[..., None], args: tuple, timeout: float | None, async_op: bool) -> Work:
        """A collective, on the caller's thread at once when nothing is queued (no closure, no thread; allreduce
        inlines the same), else through :meth:`_run`. ``args`` are not kept beyond the call unless queued."""
        if async_op or self._workers or self._closed or self._sync.broken:
            return self._run("coll", fn, args, timeout, async_op)
        sync = self._sync
        sync.timeout, sync.spin = (self.timeout if timeout is None else timeout), sync.full_spin
        fn(*args)
        return _DONE

    def _timed(self, kind: str, timeout: float, fn: Callable[..., None], args: tuple, spin: int) -> None:
        if kind == "coll":  # collectives run one at a time; p2p waits take their timeout as an argument
            self._sync.timeout, self._sync.spin = timeout, spin
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
        if async_op or self._workers or self._closed or self._sync.broken:
            return self._run("coll", self._algo.allreduce, (tensor, op, fingerprint), timeout, async_op)
        sync = self._sync  # _coll inlined: the 4 KiB allreduce is the op whose latency counts most
        sync.timeout, sync.spin = (self.timeout if timeout is None else timeout), sync.full_spin
        self._algo.allreduce(tensor, op, fingerprint)
        return _DONE

    def broadcast(
        self,
        tensor: torch.Tensor,
        src: int,
        *,
        fingerprint: Fingerprint | None = None,
        async_op: bool = False,
        timeout: float | None = None,
    ) -> Work:
        return self._coll(self._algo.broadcast, (tensor, src, fingerprint), timeout, async_op)

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
        if outputs[self.rank].nbytes != tensor.nbytes:
            raise InvalidTensorError(
                f"rank {self._where}: allgather output {self.rank} has {outputs[self.rank].nbytes} bytes but the "
                f"input has {tensor.nbytes}"
            )
        outs = list(outputs) if async_op else outputs  # a queued op keeps its own list
        return self._coll(self._algo.allgather, (outs, tensor, fingerprint), timeout, async_op)

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
        if type(op) is not ReduceOp:
            op = ReduceOp(op)
        args = (output, list(inputs) if async_op else inputs, op, fingerprint)
        return self._coll(self._algo.reduce_scatter, args, timeout, async_op)

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
        return self._run("coll", self._algo.all_to_all, (list(outputs), list(inputs), fingerprint), timeout, async_op)

    def barrier(
        self, *, fingerprint: Fingerprint | None = None, async_op: bool = False, timeout: float | None = None
    ) -> Work:
        return self._coll(self._algo.barrier, (fingerprint,), timeout, async_op)

    # -- point to point ----------------------------------------------------------------------
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
        return self._run("send", self._mail.send, (tensor, dst, tag, fingerprint), timeout, async_op)

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
        return self._run("recv", self._mail.recv, (tensor, src, tag, fingerprint), timeout, async_op)

    def _peer_ok(self, peer: int, what: str) -> None:
        if not 0 <= peer < self.world_size:
            raise InvalidTensorError(f"rank {self._where}: {what} peer {peer} outside group of size {self.world_size}")
