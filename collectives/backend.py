"""The one small Protocol every transport implements.

Why a Protocol and not a base class: backends wrap very different libraries
(torch.distributed, mpi4py, CuPy's NCCL, our shared memory) and share no code; the
:class:`~collectives.communicator.Communicator` adds everything common (argument
checks, cross-rank fingerprint checks, timeouts, sync/async forms) on top.

Call order, all ranks of the group: construct via ``create(env, store, timeout, device=)``,
then any sequence of ops issued in the same order on every rank, then ``close()``. Every
op starts the collective and returns a :class:`~collectives.types.Work`; the communicator
waits on it for the synchronous form. Tensors are contiguous and of a supported dtype by
the time they reach a backend (the communicator enforces this). ``Work.wait(timeout)``
raises :class:`~collectives.errors.CollectiveTimeoutError` when time runs out and
:class:`~collectives.errors.PeerDiedError` when the transport saw a peer go.

Capabilities are declared, not probed: every backend class subclasses :class:`Backend`
(explicitly, so it inherits the defaults below) and overrides what it has:

* ``checks_inline`` (class attribute, default False): True for a backend that verifies the
  communicator's fingerprint inside its own synchronisation; it must then satisfy
  :class:`InlineCheckingBackend` (every op takes ``fingerprint=``, ``timeout=`` and
  ``async_op=``, and raises ``fingerprint.mismatch_error(mine, theirs)`` on every rank).
  For the others the communicator runs ``collectives.checks`` through the backend's own
  ``allreduce``/``send`` on ``device``;
* ``device`` (default None, meaning the CPU): where the communicator's own small tensors
  (checks) must live;
* ``store`` (default None): a torch.distributed Store the communicator uses to name
  missing ranks after a timeout;
* ``alloc(shape, dtype)`` (default: ``torch.empty`` on ``device``): the backend's
  preferred memory for zero-copy ops;
* ``abortable`` (class attribute, default False): True for a backend that can wake a pending op
  from another thread and be replaced by a new group afterwards; it must then satisfy
  :class:`AbortableBackend` (``abort(reason)``). shm and torch (gloo, nccl) can; mpi cannot (an
  MPI communicator with a dead member is only left by ending the processes);
* ``repeatable_allreduce(tensor, op)`` (default: a new ``allreduce`` per run): one allreduce of a
  buffer the communicator owns, run again and again (the carried check's frame, ``collectives.carried``);
  mpi makes it a persistent request.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal, Protocol

import torch

from .types import ReduceOp, Work


class Repeatable(Protocol):
    """An op set up once and run many times; ``run`` blocks until done (raising as ``Work.wait`` does)."""

    def run(self, timeout: float | None) -> None: ...


class RepeatedAllreduce:
    """The default :class:`Repeatable` allreduce: a new backend op per run."""

    __slots__ = ("_backend", "_tensor", "_op")

    def __init__(self, backend: Backend, tensor: torch.Tensor, op: ReduceOp):
        self._backend, self._tensor, self._op = backend, tensor, op

    def run(self, timeout: float | None) -> None:
        self._backend.allreduce(self._tensor, self._op).wait(timeout)


class Backend(Protocol):
    name: ClassVar[str]
    checks_inline: ClassVar[bool] = False
    abortable: ClassVar[bool] = False
    rank: int
    world_size: int
    device: torch.device | None = None
    store: object | None = None  # a torch.distributed.Store

    def alloc(self, shape: Sequence[int] | int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A tensor in the backend's preferred memory. Collective for backends whose memory is shared."""
        return torch.empty(shape, dtype=dtype, device=self.device)

    def repeatable_allreduce(self, tensor: torch.Tensor, op: ReduceOp) -> Repeatable:
        """An allreduce of ``tensor`` with ``op``, run by each ``run(timeout)``. Every rank of the group
        sets up the same ones in the same order; ``tensor`` stays alive and in place while in use."""
        return RepeatedAllreduce(self, tensor, op)

    @classmethod
    def is_available(cls) -> bool:
        """True when the libraries (and devices) this backend needs are present. Never raises."""
        ...

    def allreduce(self, tensor: torch.Tensor, op: ReduceOp) -> Work: ...

    def broadcast(self, tensor: torch.Tensor, src: int) -> Work: ...

    def allgather(self, outputs: Sequence[torch.Tensor], tensor: torch.Tensor) -> Work:
        """``outputs[r]`` receives rank r's ``tensor``; sizes may differ per rank."""
        ...

    def reduce_scatter(self, output: torch.Tensor, inputs: Sequence[torch.Tensor], op: ReduceOp) -> Work:
        """``output`` receives the reduction over ranks of ``inputs[self.rank]``."""
        ...

    def all_to_all(self, outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]) -> Work:
        """``inputs[r]`` goes to rank r, ``outputs[r]`` comes from rank r (sizes may differ)."""
        ...

    def send(self, tensor: torch.Tensor, dst: int, tag: int) -> Work: ...

    def recv(self, tensor: torch.Tensor, src: int, tag: int) -> Work: ...

    def barrier(self) -> Work: ...

    def new_group(self, ranks: Sequence[int]) -> Backend | None:
        """``ranks`` ascending. Every member calls it; so do non-members (they get None), in
        the same order on all ranks. A backend may rely on members only (torch, mpi, nccl do)."""
        ...

    def close(self) -> None: ...


class InlineCheckingBackend(Backend, Protocol):
    """A backend that checks fingerprints inside its own synchronisation (``shm``). Its ops also
    take ``fingerprint`` (None when checks are off), ``async_op`` (run on its own thread) and
    ``timeout`` (seconds, for this op)."""

    checks_inline: ClassVar[Literal[True]] = True

    def allreduce(
        self, tensor: torch.Tensor, op: ReduceOp, *, fingerprint=None, async_op=False, timeout=None
    ) -> Work: ...

    def broadcast(self, tensor: torch.Tensor, src: int, *, fingerprint=None, async_op=False, timeout=None) -> Work: ...

    def allgather(
        self, outputs: Sequence[torch.Tensor], tensor: torch.Tensor, *, fingerprint=None, async_op=False, timeout=None
    ) -> Work: ...

    def reduce_scatter(
        self,
        output: torch.Tensor,
        inputs: Sequence[torch.Tensor],
        op: ReduceOp,
        *,
        fingerprint=None,
        async_op=False,
        timeout=None,
    ) -> Work: ...

    def all_to_all(
        self,
        outputs: Sequence[torch.Tensor],
        inputs: Sequence[torch.Tensor],
        *,
        fingerprint=None,
        async_op=False,
        timeout=None,
    ) -> Work: ...

    def send(
        self, tensor: torch.Tensor, dst: int, tag: int, *, fingerprint=None, async_op=False, timeout=None
    ) -> Work: ...

    def recv(
        self, tensor: torch.Tensor, src: int, tag: int, *, fingerprint=None, async_op=False, timeout=None
    ) -> Work: ...

    def barrier(self, *, fingerprint=None, async_op=False, timeout=None) -> Work: ...


class AbortableBackend(Backend, Protocol):
    """A backend whose pending ops can be woken from another thread (``shm``, ``torch``).

    ``watch_aborts()``: every rank, before the ops an abort should be able to wake (torch then waits
    on an event per pending op instead of inside gloo; shm checks anyway).
    ``abort(reason)``: any thread, any time, idempotent, never blocks. Every op of this group and of
    the groups made from it that is pending or issued afterwards raises
    :class:`~collectives.errors.CollectiveAbortedError` with ``reason`` (within milliseconds for shm,
    at once for torch); the group is then only good for ``close()``. The ranks rebuild by creating a
    new world (``collectives.init``) under a fresh store namespace."""

    abortable: ClassVar[Literal[True]] = True

    def watch_aborts(self) -> None: ...

    def abort(self, reason: str) -> None: ...
