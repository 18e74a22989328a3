"""torch.distributed as a backend: gloo on CPU tensors, nccl on CUDA tensors.

Bootstrapped from the job's store (our authenticated rendezvous store where the
launcher provides one); without one, see ``store_fallback`` (no unauthenticated TCPStore
unless the user opts in). A process group the user initialised already is used as is.

Abortable (:class:`~collectives.backend.AbortableBackend`): once ``watch_aborts()`` was called a wait
blocks on an event set by the op's completion (a done-callback on its future; p2p ops, which gloo
gives no future, poll) or by ``abort``, since gloo's own wait can be neither interrupted nor sliced
(a timed-out wait closes the pair). ``abort`` also aborts the process groups (NCCL's communicator
abort; not verified here, no GPU). The ranks rebuild with ``close()`` and a new ``create`` under a
fresh store namespace (the launcher's store prefixes keys with the attempt).
"""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.distributed as dist

from ..abort import AbortSignal
from ..backend import AbortableBackend
from ..env import DistEnv
from ..errors import CollectivesError, CollectiveTimeoutError, PeerDiedError
from ..types import ReduceOp, Work
from .loopback import pin_one_host_job
from .store_fallback import fallback_store

_OPS = {
    ReduceOp.SUM: dist.ReduceOp.SUM,
    ReduceOp.AVG: dist.ReduceOp.SUM,  # gloo has no AVG: sum, then divide on completion
    ReduceOp.MIN: dist.ReduceOp.MIN,
    ReduceOp.MAX: dist.ReduceOp.MAX,
    ReduceOp.PROD: dist.ReduceOp.PRODUCT,
}


class _TorchWork:
    """Wraps torch's Work; runs ``then`` once after completion (AVG division, copy-out)."""

    def __init__(self, work, then=None):
        self._work, self._then, self._done = work, then, False

    def wait(self, timeout: float | None = None) -> None:
        if self._done:
            return
        if self._work is not None:
            if _SIGNAL.watched:
                _wait_abortably(self._work, timeout)
            try:
                if timeout is None:
                    self._work.wait()
                else:
                    self._work.wait(datetime.timedelta(seconds=timeout))
            except RuntimeError as exc:
                raise _translate(exc) from exc
        if self._then is not None:
            self._then()
        self._done = True

    def is_completed(self) -> bool:
        return self._done or self._work is None or self._work.is_completed()


def _wait_abortably(work, timeout: float | None) -> None:
    """Until ``work`` completes (its error, if any, is raised by the caller's ``work.wait()``), raising
    CollectiveAbortedError when the signal is set first and CollectiveTimeoutError after ``timeout``."""
    _SIGNAL.check(_WHERE[0], "torch.distributed op")
    if work.is_completed():
        return
    done = threading.Event()
    try:
        work.get_future().add_done_callback(lambda _f: done.set())
    except RuntimeError:  # gloo's send/recv have no future: poll, a millisecond at a time
        deadline = None if timeout is None else time.monotonic() + timeout
        while not work.is_completed():
            _SIGNAL.check(_WHERE[0], "torch.distributed send/recv")
            if deadline is not None and time.monotonic() > deadline:
                raise CollectiveTimeoutError(f"rank {_WHERE[0]}: torch.distributed send/recv timed out") from None
            time.sleep(1e-3)
        return
    if not _SIGNAL.wait(done, timeout):
        raise CollectiveTimeoutError(f"rank {_WHERE[0]}: torch.distributed op timed out after {timeout:g}s")
    _SIGNAL.check(_WHERE[0], "torch.distributed op")


class TorchBackend(AbortableBackend):
    name: ClassVar[str] = "torch"
    device: torch.device | None = None  # where the communicator's own check tensors live

    def __init__(self, rank: int, world_size: int, group=None, global_ranks: Sequence[int] | None = None, store=None):
        self.rank, self.world_size, self._group, self.store = rank, world_size, group, store
        self._global_ranks = list(global_ranks) if global_ranks is not None else list(range(world_size))

    @classmethod
    def is_available(cls) -> bool:
        return dist.is_available()

    @classmethod
    def create(cls, env: DistEnv, store: dist.Store | None, timeout: float, device: str = "cpu") -> TorchBackend:
        if store is None and not dist.is_initialized():
            store = fallback_store(env, timeout, "torch")
        if not dist.is_initialized():
            pin_one_host_job(env)  # gloo's device (and NCCL's bootstrap) on lo when every rank is here
            dist.init_process_group(
                backend="nccl" if device.startswith("cuda") else "gloo",
                store=dist.PrefixStore("collectives/torch", store),
                rank=env.rank,
                world_size=env.world_size,
                timeout=datetime.timedelta(seconds=timeout),
            )
        # The store also serves the communicator's timeout diagnostics (who never arrived).
        if store is None:
            store = dist.distributed_c10d._get_default_store()
        diag = dist.PrefixStore("collectives/diag", store)
        global _SIGNAL
        _SIGNAL = AbortSignal()  # a new world: an earlier world's abort does not carry over
        _WHERE[0] = env.where
        backend = cls(dist.get_rank(), dist.get_world_size(), store=diag)
        backend.device = torch.device(device) if device.startswith("cuda") else None
        return backend

    def _g(self, r: int) -> int:
        return self._global_ranks[r]

    def allreduce(self, tensor: torch.Tensor, op: ReduceOp) -> Work:
        work = dist.all_reduce(tensor, op=_OPS[op], group=self._group, async_op=True)
        then = (lambda: tensor.div_(self.world_size)) if op is ReduceOp.AVG else None
        return _TorchWork(work, then)

    def broadcast(self, tensor: torch.Tensor, src: int) -> Work:
        return _TorchWork(dist.broadcast(tensor, src=self._g(src), group=self._group, async_op=True))

    def allgather(self, outputs: Sequence[torch.Tensor], tensor: torch.Tensor) -> Work:
        sizes = [o.numel() for o in outputs]
        if len(set(sizes)) == 1:
            return _TorchWork(dist.all_gather(list(outputs), tensor, group=self._group, async_op=True))
        # Unequal sizes: gather padded flat buffers, then unpad.
        n = max(sizes)
        padded = torch.zeros(n, dtype=tensor.dtype, device=tensor.device)
        padded[: tensor.numel()] = tensor.reshape(-1)
        bufs = [torch.empty_like(padded) for _ in outputs]
        work = dist.all_gather(bufs, padded, group=self._group, async_op=True)

        def unpad():
            for o, b in zip(outputs, bufs):
                o.copy_(b[: o.numel()].view_as(o))

        return _TorchWork(work, unpad)

    def reduce_scatter(self, output: torch.Tensor, inputs: Sequence[torch.Tensor], op: ReduceOp) -> Work:
        # gloo lacks reduce_scatter: allreduce a flat concatenation and keep our slice.
        flat = torch.cat([t.reshape(-1) for t in inputs])
        work = dist.all_reduce(flat, op=_OPS[op], group=self._group, async_op=True)
        start = sum(t.numel() for t in inputs[: self.rank])

        def take():
            part = flat[start : start + output.numel()].view_as(output)
            output.copy_(part / self.world_size if op is ReduceOp.AVG else part)

        return _TorchWork(work, take)

    def all_to_all(self, outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]) -> Work:
        # gloo has no all_to_all: one round of paired send/recv per peer.
        works = []
        for peer in range(self.world_size):
            if peer == self.rank:
                outputs[peer].copy_(inputs[peer])
                continue
            if inputs[peer].numel():
                works.append(dist.isend(inputs[peer], self._g(peer), group=self._group))
            if outputs[peer].numel():
                works.append(dist.irecv(outputs[peer], self._g(peer), group=self._group))
        return _MultiWork([_TorchWork(w) for w in works])

    def send(self, tensor: torch.Tensor, dst: int, tag: int) -> Work:
        return _TorchWork(dist.isend(tensor, self._g(dst), group=self._group, tag=tag))

    def recv(self, tensor: torch.Tensor, src: int, tag: int) -> Work:
        return _TorchWork(dist.irecv(tensor, self._g(src), group=self._group, tag=tag))

    def barrier(self) -> Work:
        return _TorchWork(dist.barrier(group=self._group, async_op=True))

    def new_group(self, ranks: Sequence[int]) -> TorchBackend | None:
        """Only members need to call it (torch's local synchronisation); others get None."""
        if self.rank not in ranks:
            return None
        global_ranks = [self._g(r) for r in ranks]
        key = tuple(global_ranks)
        if key not in _GROUPS:  # torch names local-sync groups by their ranks: create each once
            _GROUPS[key] = dist.new_group(global_ranks, use_local_synchronization=True)
        sub = TorchBackend(list(ranks).index(self.rank), len(ranks), _GROUPS[key], global_ranks, self.store)
        sub.device = self.device
        return sub

    def watch_aborts(self) -> None:
        _SIGNAL.watched = True

    def abort(self, reason: str) -> None:
        """Any thread: wake every pending op of this process's groups with CollectiveAbortedError."""
        _SIGNAL.set(reason)
        if self.device is not None and dist.is_initialized():  # NCCL: ncclCommAbort wakes its kernels
            for group in [*_GROUPS.values(), dist.group.WORLD]:
                group.abort()

    def close(self) -> None:
        if self._group is None and dist.is_initialized():
            _GROUPS.clear()
            dist.destroy_process_group()


_GROUPS: dict[tuple[int, ...], object] = {}
# One per world: torch's groups share the process's state, so an abort reaches all of them.
_SIGNAL = AbortSignal()
_WHERE = ["?"]  # this process's rank@host, for the messages


def _translate(exc: RuntimeError) -> CollectivesError:
    text = str(exc)
    low = text.lower()
    if "timed out" in low or "timeout" in low:
        return CollectiveTimeoutError(text.splitlines()[0] if text else "timed out")
    if any(s in low for s in ("closed by peer", "connection reset", "broken pipe", "connection refused", "eof")):
        return PeerDiedError(
            f"a peer closed its connection ({text.splitlines()[0]})\n"
            "HINT: look for the first rank that crashed; this rank only saw it go away"
        )
    return CollectivesError(f"torch.distributed failed: {text}")


class _MultiWork:
    def __init__(self, works):
        self._works = works

    def wait(self, timeout: float | None = None) -> None:
        for w in self._works:
            w.wait(timeout)

    def is_completed(self) -> bool:
        return all(w.is_completed() for w in self._works)
