"""The public communicator: one API over every backend.

All ranks of a group call the same ops in the same order. Each op works in place on
torch tensors, takes an optional ``timeout`` (seconds) and, with ``async_op=True``,
returns a :class:`Work` whose ``wait()`` completes it; otherwise it blocks and returns
None. Argument checks (dtype, layout, sizes) happen here, once, for every backend, and
so do the cross-rank fingerprint checks (see ``collectives.checks``) unless the backend
checks inline (an :class:`~collectives.backend.InlineCheckingBackend`: it gets ``fingerprint=`` on every op).

Async ops still check synchronously: the call returns once every rank has posted the
same op (or raises), and the transfer itself overlaps with whatever the caller does next.

The steps every op takes live in ``calls.py`` (:class:`CallPath`), the argument checks in
``arguments.py`` (:class:`ArgumentChecks`); this module is the API.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence

import torch

from . import carried, checks, registry
from .arguments import ArgumentChecks
from .backend import AbortableBackend, Backend
from .calls import ORPHANS, PLAIN, STRIDED, CallPath, Handle, Spec
from .env import DistEnv, read_env
from .errors import BackendUnavailableError, CollectivesError, CollectiveTimeoutError, InvalidTensorError
from .fingerprint import Fingerprint
from .flight_recorder import RECORDER, maybe_start_watch
from .types import ReduceOp, Work

log = logging.getLogger(__name__)


class Communicator(CallPath, ArgumentChecks):
    """A group of ranks and the backend that moves their tensors. Build with :func:`init`."""

    def __init__(
        self,
        backend: Backend,
        env: DistEnv,
        *,
        check: bool = True,
        timeout: float = 300.0,
        group: str = "world",
        global_ranks: Sequence[int] | None = None,
        store=None,
    ):
        self.backend, self.env, self.check, self.timeout, self.group = backend, env, check, timeout, group
        self.global_ranks = list(global_ranks) if global_ranks is not None else list(range(backend.world_size))
        self.store = store if store is not None else backend.store
        self.job_store = None  # set by init(): the store the ranks met through, held while this lives
        self._inline = type(backend).checks_inline
        world = backend.world_size
        cpu = backend.device is None or backend.device.type == "cpu"
        usable = not self._inline and cpu and world > 1 and carried.chunk_bits(world)
        self._frame = carried.Frame(backend) if usable else None
        self._seq = 0
        self._grank = self.global_ranks[backend.rank]
        self._specs: dict[tuple, Spec] = {}
        self._sent: dict[int, int] = defaultdict(int)
        self._received: dict[int, int] = defaultdict(int)

    def __repr__(self) -> str:
        return (
            f"Communicator({self.backend.name}, group {self.group!r}, "
            f"rank={self.rank}/{self.world_size} on {self.env.host})"
        )

    # -- collectives ---------------------------------------------------------------------
    def allreduce(
        self, tensor: torch.Tensor, op: ReduceOp = ReduceOp.SUM, *, async_op: bool = False, timeout: float | None = None
    ) -> Work | None:
        """All ranks: reduce ``tensor`` over the group, in place."""
        if type(tensor) in PLAIN and not async_op:
            spec = self._specs.get(("allreduce", tensor.shape, tensor.dtype, op))
            if spec is not None and tensor.layout is STRIDED and tensor.is_contiguous():
                carry = spec.carry
                if carry is None or (tensor.data_ptr() != carry.ptr and not carry.bind(tensor)):
                    return self._call(spec, self.backend.allreduce, (tensor, spec.arg), timeout)
                # Riding in the frame (CallPath._carried's steps, inlined: a call costs a tenth of the 4 KiB op).
                seq = self._seq
                self._seq = seq + 1
                timeout = self.timeout if timeout is None else timeout
                record = RECORDER.enter(seq, "allreduce", self.group, spec.shapes, spec.dtype, spec.site)
                try:
                    if not self.check:
                        carry.plain(tensor, timeout)
                    elif not carry(tensor, seq, timeout):
                        self._carry_mismatch(spec, seq, timeout)
                except CollectiveTimeoutError as exc:
                    raise self._carry_timeout(spec, seq, timeout, exc) from None
                RECORDER.end(record)
                return None
        op = ReduceOp(op)
        after: list = []
        (t,) = self._prep("allreduce", [tensor], after)
        if op is ReduceOp.AVG and not t.is_floating_point():
            raise InvalidTensorError(
                f"rank {self.env.where}: allreduce AVG of {t.dtype} would truncate"
                "\nHINT: use SUM and divide, or a floating-point tensor"
            )
        carry = t.numel() > 0 and carried.can_carry(self._frame, t, op)  # rides in the check's frame
        # An async call of an op that would ride in the frame sends the header alone, as any other op does:
        # its signature says so, or a synchronous call on another rank would sum that rank's stale payload
        # words and hand the result back (found by reading; tests/cases/collective_conformance.py).
        extra = f"op={op},async_op=True" if carry and async_op else f"op={op}"
        fp = self._fingerprint("allreduce", [t.shape], t.dtype, extra)
        if t.numel() and not (carry and async_op):
            spec = Spec(fp.op, fp.shapes, fp.dtype, fp.extra, self.group, op)
            if carry:  # (see collectives.carried)
                spec.carry = carried.CarriedOp(self._frame, spec.base, op)
            self._remember(("allreduce", t.shape, t.dtype, op), spec)
            if carry and not async_op:
                return self._carried(spec, t, timeout, fp.seq, after)
        return self._run(
            fp,
            lambda **kw: self.backend.allreduce(t, op, **kw),
            after,
            async_op,
            timeout,
            skip=t.numel() == 0 and not self._inline,
        )

    def broadcast(
        self, tensor: torch.Tensor, src: int = 0, *, async_op: bool = False, timeout: float | None = None
    ) -> Work | None:
        """All ranks: ``tensor`` on every rank becomes rank ``src``'s (group rank)."""
        if type(tensor) in PLAIN and not async_op:
            spec = self._specs.get(("broadcast", tensor.shape, tensor.dtype, src))
            if spec is not None and tensor.layout is STRIDED and tensor.is_contiguous():
                return self._call(spec, self.backend.broadcast, (tensor, src), timeout)
        self._rank_arg("broadcast", "src", src)
        after: list = []
        (t,) = self._prep("broadcast", [tensor], after)
        fp = self._fingerprint("broadcast", [t.shape], t.dtype, f"src={src}")
        if t.numel():
            self._remember(("broadcast", t.shape, t.dtype, src), Spec(fp.op, fp.shapes, fp.dtype, fp.extra, self.group))
        return self._run(
            fp,
            lambda **kw: self.backend.broadcast(t, src, **kw),
            after,
            async_op,
            timeout,
            skip=t.numel() == 0 and not self._inline,
        )

    def allgather(
        self,
        outputs: Sequence[torch.Tensor],
        tensor: torch.Tensor,
        *,
        async_op: bool = False,
        timeout: float | None = None,
    ) -> Work | None:
        """All ranks: ``outputs[r]`` receives rank r's ``tensor``; sizes may differ per rank
        (every rank passes the same list of output shapes)."""
        if not async_op:
            spec = self._specs.get(self._list_key("allgather", tensor, outputs))
            if spec is not None:
                return self._call(spec, self.backend.allgather, (outputs, tensor), timeout)
        self._list("allgather", "output", outputs)
        after: list = []
        (t,) = self._prep("allgather", [tensor], None)
        outs = self._prep("allgather", outputs, after)
        dtype = self._same_dtype("allgather", [t, *outs])
        if outs[self.rank].numel() != t.numel():
            raise InvalidTensorError(
                f"rank {self.env.where}: allgather outputs[{self.rank}] has "
                f"{outs[self.rank].numel()} elements but the input has {t.numel()}"
            )
        fp = self._fingerprint("allgather", [o.shape for o in outs], dtype)
        if any(o.numel() for o in outs):
            key = ("allgather", t.shape, dtype, None, *(o.shape for o in outs))
            self._remember(key, Spec(fp.op, fp.shapes, fp.dtype, fp.extra, self.group))
        return self._run(
            fp,
            lambda **kw: self.backend.allgather(outs, t, **kw),
            after,
            async_op,
            timeout,
            skip=all(o.numel() == 0 for o in outs) and not self._inline,
        )

    def reduce_scatter(
        self,
        output: torch.Tensor,
        inputs: Sequence[torch.Tensor],
        op: ReduceOp = ReduceOp.SUM,
        *,
        async_op: bool = False,
        timeout: float | None = None,
    ) -> Work | None:
        """All ranks: ``output`` receives the reduction over ranks of ``inputs[rank]``."""
        if not async_op:
            spec = self._specs.get(self._list_key("reduce_scatter", output, inputs, op))
            if spec is not None:
                return self._call(spec, self.backend.reduce_scatter, (output, inputs, spec.arg), timeout)
        op = ReduceOp(op)
        self._list("reduce_scatter", "input", inputs)
        after: list = []
        (o,) = self._prep("reduce_scatter", [output], after)
        ins = self._prep("reduce_scatter", inputs, None)
        dtype = self._same_dtype("reduce_scatter", [o, *ins])
        if ins[self.rank].numel() != o.numel():
            raise InvalidTensorError(
                f"rank {self.env.where}: reduce_scatter output has {o.numel()} elements "
                f"but inputs[{self.rank}] has {ins[self.rank].numel()}"
            )
        if op is ReduceOp.AVG and not o.is_floating_point():
            raise InvalidTensorError(
                f"rank {self.env.where}: reduce_scatter AVG of {dtype} would truncate"
                "\nHINT: use SUM and divide, or a floating-point tensor"
            )
        fp = self._fingerprint("reduce_scatter", [i.shape for i in ins], dtype, f"op={op}")
        if any(i.numel() for i in ins):
            key = ("reduce_scatter", o.shape, dtype, op, *(i.shape for i in ins))
            self._remember(key, Spec(fp.op, fp.shapes, fp.dtype, fp.extra, self.group, op))
        return self._run(
            fp,
            lambda **kw: self.backend.reduce_scatter(o, ins, op, **kw),
            after,
            async_op,
            timeout,
            skip=all(i.numel() == 0 for i in ins) and not self._inline,
        )

    def all_to_all(
        self,
        outputs: Sequence[torch.Tensor],
        inputs: Sequence[torch.Tensor],
        *,
        async_op: bool = False,
        timeout: float | None = None,
    ) -> Work | None:
        """All ranks: ``inputs[r]`` goes to rank r and ``outputs[r]`` comes from rank r; the
        split sizes may differ (``outputs[r]`` must match rank r's ``inputs[rank]``; the check
        cannot compare split sizes across ranks, the transport rejects a wrong one)."""
        self._list("all_to_all", "output", outputs)
        self._list("all_to_all", "input", inputs)
        after: list = []
        outs = self._prep("all_to_all", outputs, after)
        ins = self._prep("all_to_all", inputs, None)
        dtype = self._same_dtype("all_to_all", [*outs, *ins])
        fp = self._fingerprint("all_to_all", [], dtype, f"n={len(ins)}")
        return self._run(fp, lambda **kw: self.backend.all_to_all(outs, ins, **kw), after, async_op, timeout)

    def barrier(self, *, async_op: bool = False, timeout: float | None = None) -> Work | None:
        """All ranks: returns once every rank of the group has entered it."""
        fp = self._fingerprint("barrier", [], "none")
        return self._run(fp, lambda **kw: self.backend.barrier(**kw), [], async_op, timeout)

    # -- point to point ------------------------------------------------------------------
    def send(
        self, tensor: torch.Tensor, dst: int, tag: int = 0, *, async_op: bool = False, timeout: float | None = None
    ) -> Work | None:
        """This rank to group rank ``dst``; pairs with ``recv(src=this rank, tag)`` there."""
        self._p2p_args("send", dst, tag)
        (t,) = self._prep("send", [tensor], None)
        fp = self._p2p_fingerprint(t, self.rank, dst, tag, self._sent)
        return self._p2p(fp, t, dst, tag, True, async_op, timeout, [])

    def recv(
        self, tensor: torch.Tensor, src: int, tag: int = 0, *, async_op: bool = False, timeout: float | None = None
    ) -> Work | None:
        """Into ``tensor`` from group rank ``src``; pairs with ``send(dst=this rank, tag)`` there."""
        self._p2p_args("recv", src, tag)
        after: list = []
        (t,) = self._prep("recv", [tensor], after)
        fp = self._p2p_fingerprint(t, src, self.rank, tag, self._received)
        return self._p2p(fp, t, src, tag, False, async_op, timeout, after)

    def _p2p_fingerprint(self, t, src, dst, tag, counter) -> Fingerprint:
        peer = dst if src == self.rank else src
        seq = counter[peer]
        counter[peer] += 1
        g = self.global_ranks
        return self._fingerprint("p2p", [t.shape], t.dtype, f"{g[src]}->{g[dst]} tag={tag}", seq=seq)

    def _p2p(self, fp, t, peer, tag, is_send, async_op, timeout, after) -> Work | None:
        timeout = self.timeout if timeout is None else timeout
        # p2p sequence numbers count per peer pair: kept apart from the group's collectives.
        record = RECORDER.begin(fp.seq, "send" if is_send else "recv", f"{self.group}/p2p", fp.shapes, fp.dtype)
        works: list = []
        before = None
        if self._inline:
            kw = {"fingerprint": fp if self.check else None, "async_op": async_op, "timeout": timeout}
            works.append((self.backend.send if is_send else self.backend.recv)(t, peer, tag, **kw))
        else:
            if self.check and is_send:
                works.append(checks.send_fingerprint(self.backend, fp, peer))
            elif self.check:
                buf, fw = checks.post_recv_fingerprint(self.backend, peer)

                def before(buf=buf, fw=fw):
                    fw.wait(timeout)
                    try:
                        checks.verify_received(fp, buf)
                    except CollectivesError:
                        # The data receive is already posted (for overlap): keep its buffers
                        # alive, or the transport would later write into freed memory.
                        ORPHANS.append((works, t))
                        raise

            if t.numel():
                works.append((self.backend.send if is_send else self.backend.recv)(t, peer, tag))
        handle = Handle(self, fp, works, timeout, after, before, sorted({self.rank, peer}))
        handle._record = record
        if async_op:
            return handle
        handle.wait(timeout)
        return None

    # -- groups --------------------------------------------------------------------------
    def new_group(self, ranks: Sequence[int]) -> Communicator | None:
        """All ranks of this group call it with the same ``ranks`` (group ranks, any order);
        members get the new communicator (ranked in ascending order), the others None."""
        members = sorted(set(ranks))
        if not members or any(not isinstance(r, int) or not 0 <= r < self.world_size for r in members):
            raise InvalidTensorError(
                f"rank {self.env.where}: new_group({list(ranks)}) needs ranks of group "
                f"{self.group!r} in [0, {self.world_size})"
            )
        fp = self._fingerprint("new_group", [], "none", f"ranks={members}")
        self._run(fp, lambda **kw: None, [], False, None)
        return self._make_group(members)

    def _make_group(self, members: list[int]) -> Communicator | None:
        sub = self.backend.new_group(members)
        if sub is None:
            return None
        global_ranks = [self.global_ranks[r] for r in members]
        name = "[" + ",".join(map(str, global_ranks)) + "]"
        return Communicator(
            sub,
            self.env,
            check=self.check,
            timeout=self.timeout,
            group=name,
            global_ranks=global_ranks,
            store=self.store,
        )

    def split(self, color: int) -> Communicator | None:
        """All ranks: like MPI_Comm_split, ranks with the same ``color`` form a group (ranked in
        ascending order of their rank here). A negative color means "no group" (returns None)."""
        mine = torch.tensor([int(color), self.rank], dtype=torch.int64)
        table = [torch.empty(2, dtype=torch.int64) for _ in range(self.world_size)]
        self.allgather(table, mine)
        rows = [(int(t[0]), int(t[1])) for t in table]
        result = None
        # Every rank creates every group, in the same order: some backends need all ranks.
        for c in sorted({c for c, _ in rows if c >= 0}):
            sub = self._make_group(sorted(r for cc, r in rows if cc == c))
            if c == color:
                result = sub
        return result

    def alloc(self, shape: Sequence[int] | int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A tensor in the backend's preferred memory (a shared segment for ``shm``) for zero-copy ops."""
        return self.backend.alloc(shape, dtype)

    # -- abort -------------------------------------------------------------------------------
    @property
    def abortable(self) -> bool:
        """Whether :meth:`abort` can wake this group's pending ops (declared by the backend's type)."""
        return type(self.backend).abortable

    def watch_aborts(self) -> None:
        """Every rank, before the ops :meth:`abort` should be able to wake (torch then waits on an event
        per pending op, a done-callback's cost). Raises CollectivesError on a backend that cannot abort."""
        self._abortable_backend().watch_aborts()

    def abort(self, reason: str) -> None:
        """Any thread, never blocks: every pending and later op of this communicator and the groups made
        from it raises :class:`~collectives.errors.CollectiveAbortedError` carrying ``reason`` (say who was
        lost, as rank@host); afterwards the communicator is only good for :meth:`close`, and the ranks
        build a new world with :func:`init` (under a fresh store namespace)."""
        self._abortable_backend().abort(reason)

    def _abortable_backend(self) -> AbortableBackend:
        backend = self.backend
        if not type(backend).abortable:
            raise CollectivesError(
                f"rank {self.env.where}: the {backend.name} backend cannot abort a pending collective"
                "\nHINT: recover by restarting the processes (fault_tolerance.recover: restart)"
            )
        return backend  # type: ignore[return-value]  # declared by ``abortable`` (AbortableBackend)

    def close(self) -> None:
        self.backend.close()


def init(
    backend: str = "torch",
    *,
    store=None,
    env: DistEnv | None = None,
    check: bool = True,
    timeout: float = 300.0,
    device: str = "cpu",
) -> Communicator:
    """Create the world communicator. Every rank calls it once, collectively; blocks until all join.

    ``store`` is a ``torch.distributed.Store`` the ranks share (the launcher's authenticated
    store); without one, backends bootstrap from the environment (MASTER_ADDR/MASTER_PORT, MPI).
    ``check`` turns the cross-rank fingerprint checks on (default) or off; ``timeout`` is
    the default for every op, in seconds.
    """
    env = env or read_env()
    cls = registry.get(backend)
    if not cls.is_available():
        raise BackendUnavailableError(
            f"backend {backend!r} is not available on {env.host}; available here: {', '.join(registry.available())}"
        )
    impl = cls.create(env, store, timeout, device=device)
    comm = Communicator(impl, env, check=check, timeout=timeout)
    # Held for the communicator's life: a TCPStore's server lives in rank 0's store object, and
    # dropping it (a caller's local going out of scope) would close the rendezvous under slower peers.
    comm.job_store = store
    maybe_start_watch(env.rank, env.host)  # under the launcher's hang watch: beats and dumps on request
    log.debug("rank %s: initialised %r", env.where, comm)
    return comm
