"""MPI as a backend: mpi4py's buffer methods (Capitalized: no pickles) over MPICH.

Two ways to start:
- under ``mpiexec``/``srun --mpi=pmi2`` (the MPI launcher already gave each process its PMI
  connection): MPI_COMM_WORLD is the job;
- under our launcher, torchrun or the test harness (no MPI launcher): rank 0 serves the
  small PMI-1 wire protocol MPICH speaks to ``mpiexec`` (see :class:`_PMIServer`), every
  rank finds it through the job's store and sets ``PMI_PORT``/``PMI_ID`` before MPI
  initialises, so MPI_COMM_WORLD is again the whole job. (MPICH's singleton
  ``Comm_connect``/``Comm_accept`` was tried first: it refuses to join singletons, whose
  process ids all collide.) MPI must not be initialised before ``collectives.init``.

Every op is non-blocking (``Iallreduce``...) and ``wait`` drives MPI progress with
``Testall`` until done or the timeout, so a missing rank is a timeout, not a hang.
bfloat16 and float16 have no MPI type: reductions run on a float32 copy (exact for
2 ranks; with more ranks one rounding at the end instead of one per step), everything
else moves them as 16-bit words.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch

from ...backend import Backend, Repeatable
from ...env import DistEnv, usable_cores
from ...errors import CollectivesError, CollectiveTimeoutError, InvalidTensorError, PeerDiedError
from ...types import ReduceOp, Work
from ..store_fallback import fallback_store
from . import bootstrap

_MPI = None  # the mpi4py.MPI module, set by MPIBackend.create (bootstrap.init_mpi imports it)


_TYPES: dict = {}  # torch dtype -> MPI datatype, filled once MPI is imported
_OPS: dict = {}  # ReduceOp -> MPI op


def _tables(m) -> None:
    _TYPES.update(
        {
            torch.float32: m.FLOAT,
            torch.float64: m.DOUBLE,
            torch.int32: m.INT32_T,
            torch.int64: m.INT64_T,
            torch.float16: m.UINT16_T,
            torch.bfloat16: m.UINT16_T,
            torch.uint8: m.BYTE,
        }
    )
    _OPS.update(
        {ReduceOp.SUM: m.SUM, ReduceOp.AVG: m.SUM, ReduceOp.MIN: m.MIN, ReduceOp.MAX: m.MAX, ReduceOp.PROD: m.PROD}
    )


def _cpu(t: torch.Tensor) -> None:
    if t.device.type != "cpu":
        raise InvalidTensorError(
            f"the mpi backend moves CPU tensors only, got one on {t.device}"
            "\nHINT: use backend='nccl' or 'torch' for CUDA tensors"
        )


_SPECS: dict = {}  # (address, bytes, dtype) -> buffer spec of a recent operand (built once, reused per call)
_MAX_SPECS = 2048
_HALF = (torch.float16, torch.bfloat16)


def _buf(t: torch.Tensor):
    """Zero-copy MPI buffer spec of a contiguous CPU tensor. Specs are cached by address: one names
    memory, not its owner, and is only used while a live operand occupies exactly that memory."""
    key = (t.data_ptr(), t.nbytes, t.dtype)
    spec = _SPECS.get(key)
    if spec is None:
        if t.is_cuda:
            _cpu(t)
        spec = _remember(key, [_MPI.buffer.fromaddress(key[0], key[1]), t.numel(), _TYPES[t.dtype]])
    return spec


def _remember(key: tuple, spec):
    """Cache ``spec`` under ``key`` in ``_SPECS`` (emptied when full) and return it."""
    if len(_SPECS) >= _MAX_SPECS:
        _SPECS.clear()
    _SPECS[key] = spec
    return spec


def _bytes(t: torch.Tensor):
    _cpu(t)
    return [_MPI.buffer.fromaddress(t.data_ptr(), t.nbytes), t.nbytes, _MPI.BYTE]


def _half(t: torch.Tensor) -> bool:
    return t.dtype in _HALF


# Tests in a bare loop before the clock and a yield (a 4 KiB op polls tens of times). When this host's ranks
# outnumber its cores (set at create), a few: a rank polling for long keeps the core from the peer it waits for.
_POLLS = range(256)
_CROWDED_POLLS = range(4)
_AVG = ReduceOp.AVG
_F16, _BF16 = torch.float16, torch.bfloat16


class _MPIWork:
    """One request plus what to do once it completes (copy out, divide, downcast); ``keep`` holds the
    request's buffers alive until then."""

    __slots__ = ("_req", "_then", "_keep", "_done")

    def __init__(self, req, then=None, keep=None):
        self._req, self._then, self._keep, self._done = req, then, keep, False

    def wait(self, timeout: float | None = None) -> None:
        if self._done:
            return
        test = self._req.Test
        try:
            for _ in _POLLS:
                if test():
                    break
            else:
                self._wait_long(test, timeout)
        except _MPI.Exception as exc:
            _failed(exc)
        if self._then is not None:
            self._then()
        self._done = True

    @staticmethod
    def _wait_long(test: Callable[[], bool], timeout: float | None) -> None:
        """Past the first polls: the clock and a yield every ``_POLLS`` polls, until done or the timeout."""
        deadline = float("inf") if timeout is None else time.monotonic() + timeout
        while True:
            os.sched_yield()  # let a peer sharing this core run
            for _ in _POLLS:
                if test():
                    return
            if time.monotonic() > deadline:
                bootstrap.HEALTHY = False
                raise CollectiveTimeoutError(f"MPI requests still pending after {timeout:g}s")

    def is_completed(self) -> bool:
        return self._done or self._req.Test()


class _Persistent(_MPIWork):
    """A persistent request (MPI-4 ``*_init``): each run starts it again and waits as any op does."""

    __slots__ = ()

    def run(self, timeout: float | None) -> None:
        """Start it and poll it as :meth:`wait` does (inlined: this is the carried check's hot path)."""
        req = self._req
        test = req.Test
        try:
            req.Start()
            for _ in _POLLS:
                if test():
                    return
            self._wait_long(test, timeout)
        except _MPI.Exception as exc:
            _failed(exc)


def _failed(exc) -> None:
    """Raise an MPI error as ours: a dead peer's as :class:`PeerDiedError`."""
    bootstrap.HEALTHY = False
    cls = exc.Get_error_class()
    text = exc.Get_error_string().splitlines()[0]
    if cls in (getattr(_MPI, "ERR_PROC_FAILED", -1), _MPI.ERR_OTHER, _MPI.ERR_INTERN):
        raise PeerDiedError(
            f"MPI failed, most likely a peer died ({text})\nHINT: look for the first rank that crashed"
        ) from None
    raise CollectivesError(f"MPI failed: {text}") from None


class MPIBackend(Backend):
    name: ClassVar[str] = "mpi"

    def __init__(self, comm, store=None):
        self._comm, self.store = comm, store
        self._repeated = None  # a duplicate of comm for persistent requests, made by the first one
        self.rank, self.world_size = comm.Get_rank(), comm.Get_size()

    @classmethod
    def is_available(cls) -> bool:
        return importlib.util.find_spec("mpi4py") is not None

    @classmethod
    def create(cls, env: DistEnv, store, timeout: float, device: str = "cpu") -> MPIBackend:
        if device != "cpu":
            raise CollectivesError(
                f"rank {env.where}: the mpi backend moves CPU tensors only, not {device!r}"
                "\nHINT: use backend='nccl' or 'torch' for CUDA tensors"
            )
        if store is None and not bootstrap.mpi_launched() and env.world_size > 1:
            store = fallback_store(env, timeout, "mpi")  # the PMI server's address travels through it
        MPI = bootstrap.init_mpi(env, store, timeout)
        global _MPI
        if _MPI is None:
            _MPI = MPI
            _tables(MPI)
        if env.local_world_size > usable_cores():
            global _POLLS
            _POLLS = _CROWDED_POLLS
        world = MPI.COMM_WORLD
        if world.Get_size() != env.world_size or world.Get_rank() != env.rank:
            raise CollectivesError(
                f"rank {env.where}: MPI_COMM_WORLD is rank {world.Get_rank()} of {world.Get_size()} but the "
                f"{env.source} environment says rank {env.rank} of {env.world_size}\n"
                "HINT: was mpi4py imported (initialising MPI) before collectives.init('mpi')?"
            )
        comm = world.Dup()
        comm.Set_errhandler(MPI.ERRORS_RETURN)
        if store is not None:
            import torch.distributed as dist

            store = dist.PrefixStore("collectives/diag", store)
        return cls(comm, store)

    # -- ops ------------------------------------------------------------------------------
    def allreduce(self, tensor: torch.Tensor, op: ReduceOp) -> Work:
        dtype = tensor.dtype
        if dtype is not _F16 and dtype is not _BF16:  # identity tests: `in` calls __eq__
            req = self._comm.Iallreduce(_MPI.IN_PLACE, _buf(tensor), _OPS[op])
            if op is not _AVG:
                return _MPIWork(req, None, tensor)
            return _MPIWork(req, lambda: tensor.div_(self.world_size), tensor)
        work = tensor.float()  # no MPI type for half types: reduce in float32, round once

        def then():
            if op is ReduceOp.AVG:
                work.div_(self.world_size)
            tensor.copy_(work)

        return _MPIWork(self._comm.Iallreduce(_MPI.IN_PLACE, _buf(work), _OPS[op]), then, work)

    def repeatable_allreduce(self, tensor: torch.Tensor, op: ReduceOp) -> Repeatable:
        """A persistent request (started again each run: no schedule built per op; 2 ranks, 4 KiB: ~1.4 us
        less than Iallreduce) on a duplicate of the communicator, so its starts need not be ordered with the
        other ops (every rank runs the same persistent ones in the same order). MPI before 4: the default."""
        if _half(tensor) or op is _AVG or _MPI.Get_version() < (4, 0):
            return super().repeatable_allreduce(tensor, op)
        if self._repeated is None:  # collective: the first one is set up at the same op on every rank
            self._repeated = self._comm.Dup()
            self._repeated.Set_errhandler(_MPI.ERRORS_RETURN)
        return _Persistent(self._repeated.Allreduce_init(_MPI.IN_PLACE, _buf(tensor), _OPS[op]), None, tensor)

    def broadcast(self, tensor: torch.Tensor, src: int) -> Work:
        return _MPIWork(self._comm.Ibcast(_buf(tensor), src), None, tensor)

    def allgather(self, outputs: Sequence[torch.Tensor], tensor: torch.Tensor) -> Work:
        # One pass over the outputs (their addresses and sizes) keys the cached specs: a small allgather's
        # Python is most of its time.
        ptrs = [o.data_ptr() for o in outputs]
        key = (tensor.data_ptr(), tensor.nbytes, tensor.dtype, *ptrs, *[o.numel() for o in outputs])
        spec = _SPECS.get(key)
        if spec is None:
            spec = self._gathered(key, outputs, tensor)
        if spec:  # straight into the outputs, wherever they lie (one buffer: Iallgather, else Iallgatherv)
            if len(spec[1]) == 3:
                return _MPIWork(self._comm.Iallgather(spec[0], spec[1]), None, (tensor, outputs))
            return _MPIWork(self._comm.Iallgatherv(spec[0], spec[1]), None, (tensor, outputs))
        counts = [o.numel() for o in outputs]
        displs = [sum(counts[:i]) for i in range(len(counts))]
        flat = torch.empty(sum(counts), dtype=tensor.dtype)
        req = self._comm.Iallgatherv(_buf(tensor), [_buf(flat)[0], counts, displs, _TYPES[tensor.dtype]])

        def then():
            for o, d, c in zip(outputs, displs, counts):
                o.copy_(flat[d : d + c].view_as(o))

        return _MPIWork(req, then, (tensor, flat))

    def _gathered(self, key: tuple, outputs: Sequence[torch.Tensor], tensor: torch.Tensor):
        """(send, receive) specs of an allgather into ``outputs``: an Iallgather's when they are one buffer's
        equal parts in rank order, else :meth:`_scattered`'s. Cached by addresses, as ``_buf``'s specs."""
        n, nbytes = tensor.numel(), tensor.nbytes
        if all(o.numel() == n for o in outputs):
            first = outputs[0].data_ptr()
            if all(o.data_ptr() == first + i * nbytes for i, o in enumerate(outputs)):  # one buffer: in place
                whole = [_MPI.buffer.fromaddress(first, nbytes * len(outputs)), n, _TYPES[tensor.dtype]]
                aliased = tensor.data_ptr() == first + self.rank * nbytes  # MPI forbids aliasing but IN_PLACE
                send = _MPI.IN_PLACE if aliased else _buf(tensor)
                return _remember(key, (send, whole))
        return self._scattered(key, outputs, tensor)

    def _scattered(self, key: tuple, outputs: Sequence[torch.Tensor], tensor: torch.Tensor):
        """(send, receive) specs of an Allgatherv into ``outputs`` where they lie: the receive buffer starts
        at the lowest output and each rank's part lands at its output's displacement from there; False
        when that cannot be said to MPI (an empty output, displacements past int32 or not whole elements,
        an input overlapping an output that is not its own). Cached by addresses, as ``_buf``'s specs."""
        size = tensor.element_size()
        ptrs = [o.data_ptr() for o in outputs]
        ends = [p + o.nbytes for p, o in zip(ptrs, outputs)]
        low = min(ptrs)
        displs = [(p - low) // size for p in ptrs]
        spec = False
        src, src_end = tensor.data_ptr(), tensor.data_ptr() + tensor.nbytes
        in_place = src == ptrs[self.rank]  # the input is this rank's output (MPI allows only IN_PLACE aliasing)
        overlaps = not in_place and any(p < src_end and src < e for p, e in zip(ptrs, ends))
        if (
            all(o.numel() for o in outputs)
            and all((p - low) % size == 0 for p in ptrs)
            and max(ends) - low < 1 << 31
            and not overlaps
        ):
            send = _MPI.IN_PLACE if in_place else _buf(tensor)
            recv = [_MPI.buffer.fromaddress(low, max(ends) - low), [o.numel() for o in outputs], displs]
            spec = (send, [*recv, _TYPES[tensor.dtype]])
        return _remember(key, spec)

    def reduce_scatter(self, output: torch.Tensor, inputs: Sequence[torch.Tensor], op: ReduceOp) -> Work:
        counts = [i.numel() for i in inputs]
        if not _half(output):  # inputs that follow each other in memory (one buffer's parts): sent from there
            first = end = inputs[0].data_ptr()
            for i in inputs:
                if i.data_ptr() != end:
                    break
                end += i.nbytes
            else:
                out = output.data_ptr()
                if end > first and not (out < end and first < out + output.nbytes):  # MPI: no aliasing
                    key = ("span", first, end - first, output.dtype)
                    send = _SPECS.get(key)
                    if send is None:
                        buf = _MPI.buffer.fromaddress(first, end - first)
                        send = _remember(key, [buf, sum(counts), _TYPES[output.dtype]])
                    req = self._comm.Ireduce_scatter(send, _buf(output), counts, _OPS[op])
                    then = (lambda: output.div_(self.world_size)) if op is ReduceOp.AVG else None
                    return _MPIWork(req, then, (inputs, output))
        flat = torch.cat([i.reshape(-1) for i in inputs])
        out = torch.empty(output.numel(), dtype=torch.float32) if _half(output) else output
        if _half(output):
            flat = flat.float()
        req = self._comm.Ireduce_scatter(_buf(flat), _buf(out), counts, _OPS[op])

        def then():
            if op is ReduceOp.AVG:
                out.div_(self.world_size)
            if out is not output:
                output.copy_(out.view_as(output))

        return _MPIWork(req, then, (flat, out))

    def all_to_all(self, outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]) -> Work:
        scounts, rcounts = [i.numel() for i in inputs], [o.numel() for o in outputs]
        sdispls = [sum(scounts[:i]) for i in range(len(scounts))]
        rdispls = [sum(rcounts[:i]) for i in range(len(rcounts))]
        sflat = torch.cat([i.reshape(-1) for i in inputs])
        rflat = torch.empty(sum(rcounts), dtype=sflat.dtype)
        mtype = _TYPES[sflat.dtype]
        req = self._comm.Ialltoallv(
            [_buf(sflat)[0], scounts, sdispls, mtype], [_buf(rflat)[0], rcounts, rdispls, mtype]
        )

        def then():
            for o, d, c in zip(outputs, rdispls, rcounts):
                o.copy_(rflat[d : d + c].view_as(o))

        return _MPIWork(req, then, (sflat, rflat))

    # Point to point moves bytes: a receive posted with the wrong size then fails cleanly
    # (MPI_ERR_TRUNCATE, or a short count) instead of tripping MPICH's unpack assertion,
    # and the communicator's fingerprint check reports the mismatch first.
    def send(self, tensor: torch.Tensor, dst: int, tag: int) -> Work:
        return _MPIWork(self._comm.Isend(_bytes(tensor), dest=dst, tag=tag), keep=tensor)

    def recv(self, tensor: torch.Tensor, src: int, tag: int) -> Work:
        return _MPIWork(self._comm.Irecv(_bytes(tensor), source=src, tag=tag), keep=tensor)

    def barrier(self) -> Work:
        return _MPIWork(self._comm.Ibarrier())

    def new_group(self, ranks: Sequence[int]) -> MPIBackend | None:
        """Only members need to call it (MPI_Comm_create_group); others get None."""
        if self.rank not in ranks:
            return None
        sub = self._comm.Create_group(self._comm.Get_group().Incl(list(ranks)), tag=hash(tuple(ranks)) & 0x3FFF)
        sub.Set_errhandler(_MPI.ERRORS_RETURN)
        return MPIBackend(sub, self.store)

    def close(self) -> None:
        if self._comm is not None and bootstrap.HEALTHY:
            self._comm.Free()
            if self._repeated is not None:
                self._repeated.Free()
        self._comm = self._repeated = None
