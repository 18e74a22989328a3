"""NCCL as a backend, through CuPy's ``cupy.cuda.nccl`` on CUDA torch tensors.

Zero copy: NCCL gets each tensor's ``data_ptr()`` directly (CuPy is only the binding; no
CuPy array is made). Ops are enqueued on torch's current CUDA stream, so they order
with the caller's kernels exactly as torch's own ops would; ``wait`` polls a CUDA event
recorded after the op, so a timeout is a timeout, not a hang. On a timeout or error the
communicator is aborted (``ncclCommAbort``), which unblocks the GPU.

The NCCL unique id (128 bytes) goes from rank 0 to the others through the job's store
(the launcher's store; without one, see ``store_fallback``).
Sub-groups get their own NCCL communicator with an id exchanged the same way.

UNVERIFIED: written without a GPU (none on the development machine); tested there are
the import, ``is_available()`` being False, the id exchange through the store and the
clear error. bfloat16 needs NCCL >= 2.10; AVG uses ncclAvg (NCCL >= 2.10).
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Sequence
from typing import ClassVar

import torch

from ..abort import AbortSignal
from ..backend import AbortableBackend
from ..env import DistEnv
from ..errors import BackendUnavailableError, CollectivesError, CollectiveTimeoutError, InvalidTensorError
from ..types import ReduceOp, Work
from .loopback import pin_one_host_job

_ID_KEY = "collectives/nccl/id/"

# NCCL enum values (nccl.h); CuPy exposes most as constants, these are stable ABI.
_DTYPES = {
    torch.int32: 2,
    torch.int64: 4,
    torch.float16: 6,
    torch.float32: 7,
    torch.float64: 8,
    torch.bfloat16: 9,
    torch.uint8: 1,
}
_OPS = {ReduceOp.SUM: 0, ReduceOp.PROD: 1, ReduceOp.MAX: 2, ReduceOp.MIN: 3, ReduceOp.AVG: 4}


def _nccl():
    from cupy.cuda import nccl

    return nccl


class _NcclWork:
    """An event recorded on the op's stream after the op; ``then`` runs on completion."""

    def __init__(self, backend: NCCLBackend, event: torch.cuda.Event, then=None, keep=()):
        self._backend, self._event, self._then, self._keep, self._done = backend, event, then, keep, False

    def wait(self, timeout: float | None = None) -> None:
        if self._done:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._event.query():
            if deadline is not None and time.monotonic() > deadline:
                self._backend._abort()
                raise CollectiveTimeoutError(f"NCCL op still running after {timeout:g}s (communicator aborted)")
            self._backend._check_async_error()
            self._backend._signal.check(f"{self._backend.rank}", "nccl op")
            time.sleep(1e-5)
        if self._then is not None:
            self._then()
        self._done = True

    def is_completed(self) -> bool:
        return self._done or self._event.query()


class NCCLBackend(AbortableBackend):
    """Abortable: ``abort`` sets the world's signal (the polling waits raise) and aborts every
    communicator of the world (``ncclCommAbort``). Not verified on a GPU in this repository's CI."""

    name: ClassVar[str] = "nccl"

    def __init__(self, comm, rank: int, world_size: int, store, device: torch.device, uid_prefix: str, signal=None):
        self._comm, self.rank, self.world_size, self.store = comm, rank, world_size, store
        self.device, self._prefix, self._groups = device, uid_prefix, 0
        self._signal = signal if signal is not None else AbortSignal()
        self._children: list[NCCLBackend] = []

    def watch_aborts(self) -> None:
        """Nothing to arm: the waits poll."""

    def abort(self, reason: str) -> None:
        self._signal.set(reason)
        if self._comm is not None:
            self._abort()
        for sub in self._children:
            sub.abort(reason)

    @classmethod
    def is_available(cls) -> bool:
        try:
            if not torch.cuda.is_available():
                return False
            return bool(_nccl().available)
        except Exception:
            return False

    @classmethod
    def create(cls, env: DistEnv, store, timeout: float, device: str = "cuda") -> NCCLBackend:
        if not torch.cuda.is_available():
            raise BackendUnavailableError(
                f"rank {env.where}: the nccl backend needs a CUDA GPU, and torch sees none"
                "\nHINT: use backend='shm' or 'torch' (gloo) on CPU-only machines"
            )
        try:
            nccl = _nccl()
        except ImportError as exc:
            raise BackendUnavailableError(
                f"rank {env.where}: cupy is not installed ({exc})\nHINT: pip install 'disttrain[nccl]' (cupy-cuda12x)"
            ) from None
        if not nccl.available:
            raise BackendUnavailableError(
                f"rank {env.where}: CuPy was built without NCCL\nHINT: pip install nvidia-nccl-cu12"
            )
        dev = torch.device(device if device.startswith("cuda:") else f"cuda:{env.local_rank}")
        torch.cuda.set_device(dev)
        if store is None:
            from .store_fallback import fallback_store

            store = fallback_store(env, timeout, "nccl")
        pin_one_host_job(env)  # NCCL's bootstrap listener on lo when every rank is here
        uid = exchange_unique_id(store, _ID_KEY + "world", env.rank == 0, timeout, nccl.get_unique_id)
        comm = nccl.NcclCommunicator(env.world_size, uid, env.rank)
        import torch.distributed as dist

        return cls(comm, env.rank, env.world_size, dist.PrefixStore("collectives/diag", store), dev, "world")

    # -- plumbing -------------------------------------------------------------------------
    def _stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream

    def _check(self, *tensors: torch.Tensor) -> None:
        for t in tensors:
            if t.device != self.device:
                raise InvalidTensorError(
                    f"rank {self.rank}: nccl ops need tensors on {self.device}, got {t.device}"
                    "\nHINT: move them with .to(device) first"
                )

    def _done(self, then=None, keep=()) -> Work:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return _NcclWork(self, event, then, keep)

    def _abort(self) -> None:
        try:
            self._comm.abort()
        except Exception:
            pass

    def _check_async_error(self) -> None:
        try:
            self._comm.check_async_error()
        except Exception as exc:
            raise CollectivesError(
                f"NCCL reported an asynchronous error: {exc}"
                "\nHINT: a peer probably died; look for the first rank that failed"
            ) from None

    # -- ops ------------------------------------------------------------------------------
    def allreduce(self, tensor: torch.Tensor, op: ReduceOp) -> Work:
        self._check(tensor)
        p = tensor.data_ptr()
        self._comm.allReduce(p, p, tensor.numel(), _DTYPES[tensor.dtype], _OPS[op], self._stream())
        return self._done(keep=(tensor,))

    def broadcast(self, tensor: torch.Tensor, src: int) -> Work:
        self._check(tensor)
        p = tensor.data_ptr()
        self._comm.broadcast(p, p, tensor.numel(), _DTYPES[tensor.dtype], src, self._stream())
        return self._done(keep=(tensor,))

    def allgather(self, outputs: Sequence[torch.Tensor], tensor: torch.Tensor) -> Work:
        self._check(tensor, *outputs)
        sizes = [o.numel() for o in outputs]
        n = max(sizes)
        if all(s == n for s in sizes):
            flat = torch.empty(n * self.world_size, dtype=tensor.dtype, device=self.device)
            src = tensor
        else:  # unequal: gather padded, then unpad
            src = torch.zeros(n, dtype=tensor.dtype, device=self.device)
            src[: tensor.numel()] = tensor.reshape(-1)
            flat = torch.empty(n * self.world_size, dtype=tensor.dtype, device=self.device)
        self._comm.allGather(src.data_ptr(), flat.data_ptr(), n, _DTYPES[tensor.dtype], self._stream())
        for r, o in enumerate(outputs):  # enqueued on the same stream: ordered after the gather
            o.copy_(flat[r * n : r * n + o.numel()].view_as(o))
        return self._done(keep=(src, flat))

    def reduce_scatter(self, output: torch.Tensor, inputs: Sequence[torch.Tensor], op: ReduceOp) -> Work:
        self._check(output, *inputs)
        sizes = [i.numel() for i in inputs]
        if all(s == sizes[0] for s in sizes):
            flat = torch.cat([i.reshape(-1) for i in inputs])
            self._comm.reduceScatter(
                flat.data_ptr(), output.data_ptr(), sizes[0], _DTYPES[output.dtype], _OPS[op], self._stream()
            )
            return self._done(keep=(flat, output))
        flat = torch.cat([i.reshape(-1) for i in inputs])  # unequal chunks: allreduce, keep ours
        self._comm.allReduce(
            flat.data_ptr(), flat.data_ptr(), flat.numel(), _DTYPES[output.dtype], _OPS[op], self._stream()
        )
        start = sum(sizes[: self.rank])
        output.copy_(flat[start : start + output.numel()].view_as(output))
        return self._done(keep=(flat,))

    def all_to_all(self, outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]) -> Work:
        self._check(*outputs, *inputs)
        nccl, stream = _nccl(), self._stream()
        nccl.groupStart()
        for peer in range(self.world_size):
            if inputs[peer].numel():
                self._comm.send(
                    inputs[peer].data_ptr(), inputs[peer].numel(), _DTYPES[inputs[peer].dtype], peer, stream
                )
            if outputs[peer].numel():
                self._comm.recv(
                    outputs[peer].data_ptr(), outputs[peer].numel(), _DTYPES[outputs[peer].dtype], peer, stream
                )
        nccl.groupEnd()
        return self._done(keep=(*inputs, *outputs))

    def send(self, tensor: torch.Tensor, dst: int, tag: int) -> Work:
        # NCCL has no tags: messages between a pair are matched in order.
        self._check(tensor)
        self._comm.send(tensor.data_ptr(), tensor.numel(), _DTYPES[tensor.dtype], dst, self._stream())
        return self._done(keep=(tensor,))

    def recv(self, tensor: torch.Tensor, src: int, tag: int) -> Work:
        self._check(tensor)
        self._comm.recv(tensor.data_ptr(), tensor.numel(), _DTYPES[tensor.dtype], src, self._stream())
        return self._done(keep=(tensor,))

    def barrier(self) -> Work:
        one = torch.zeros(1, device=self.device)
        return self.allreduce(one, ReduceOp.SUM)

    def new_group(self, ranks: Sequence[int]) -> NCCLBackend | None:
        """Only members need to call it; others get None. Ids go through the store, named by
        the parent group, the member list and a per-parent counter."""
        self._groups += 1
        if self.rank not in ranks:
            return None
        nccl = _nccl()
        prefix = f"{self._prefix}/{self._groups}/{'-'.join(map(str, ranks))}"
        sub_rank = list(ranks).index(self.rank)
        uid = exchange_unique_id(self.store, _ID_KEY + prefix, sub_rank == 0, 300.0, nccl.get_unique_id)
        comm = nccl.NcclCommunicator(len(ranks), uid, sub_rank)
        sub = NCCLBackend(comm, sub_rank, len(ranks), self.store, self.device, prefix, self._signal)
        self._children.append(sub)
        return sub

    def alloc(self, shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=self.device)

    def close(self) -> None:
        if self._comm is not None:
            self._comm.destroy()
            self._comm = None


def exchange_unique_id(store, key: str, is_root: bool, timeout: float, make_id) -> tuple:
    """Rank 0 makes the NCCL unique id and publishes it under ``key``; the others wait for it.

    CuPy represents the id as a tuple of 128 small ints; it travels as 128 bytes.
    """
    if is_root:
        uid = tuple(make_id())
        store.set(key, bytes(b & 0xFF for b in uid))
        return uid
    try:
        store.wait([key], datetime.timedelta(seconds=timeout))
    except Exception as exc:
        raise CollectiveTimeoutError(
            f"the NCCL unique id {key!r} did not arrive from rank 0 within {timeout:g}s "
            f"({exc})\nHINT: is rank 0 alive and using the same store?"
        ) from None
    raw = store.get(key)
    return tuple(b - 256 if b > 127 else b for b in raw)  # CuPy's ids are C chars (signed)
