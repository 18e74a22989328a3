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

Cross-rank checks: a backend class with ``checks_inline = True`` gets a
``fingerprint=`` keyword on every op (a :class:`~collectives.fingerprint.Fingerprint`,
or None when the user turned checks off), plus ``timeout=`` and ``async_op=``, and
verifies the fingerprint in its own synchronisation,
raising ``fingerprint.mismatch_error(mine, theirs)`` on every rank. For the others the
communicator runs ``collectives.checks`` through the backend's own ``allgather``/``send``
(on ``backend.device`` when set, else CPU). Optional attributes: ``store`` (a
torch.distributed Store the communicator uses to name missing ranks after a timeout),
``device``, and ``alloc(shape, dtype)`` for backend-preferred memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Protocol, runtime_checkable

import torch

from .types import ReduceOp, Work


@runtime_checkable
class Backend(Protocol):
    name: ClassVar[str]
    rank: int
    world_size: int

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
