"""Turning an op call into a named, described :class:`~.execution.Op` and submitting it.

Names as Horovod makes them: ``<kind>.<name>`` when the caller names the op, else
``<kind>.noname.<n>``. Horovod's ``n`` is the handle number, so its unnamed ops match only when
every rank issued the same sequence of *all* ops; ours counts the unnamed ops of that kind on
that process set, so they match whenever every member issued the same sequence of *unnamed*
ops of the kind (a superset: named ops skipped by a joined rank, or a failed submission, no
longer shift the names of later unnamed ops). Each ``*_start`` returns ``(handle number, Handle)``
at once; the engine's thread runs the op once every member of the set submitted the name.
Local argument errors (bad splits, a root outside the set, an unsupported dtype) raise here, on
the calling rank, before anything is submitted, as Horovod's enqueue functions do.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence

import torch

from . import handles
from .basics import context, process_set_worker
from .exceptions import HorovodError
from .execution import Op
from .handles import GroupHandle, Handle
from .negotiation import Announcement, describe
from .process_sets import ProcessSet
from .reduce_op import Adasum, Average, ReduceOp
from .wire import Kind, digest, dtype_name, fuse_key, to_wire


def resolve_op(op, average) -> ReduceOp:
    if op is not None and average is not None:
        raise ValueError("The op parameter supersedes average. Please provide only one of them.")
    if op is None:
        return Average if average is None or average else ReduceOp.Sum
    try:
        return ReduceOp(op)
    except ValueError:
        raise HorovodError(f"unknown reduce op {op!r}; use hvd.Average, Sum, Min, Max, Product or Adasum") from None


def _base(prefix: str, name: str | None, ps: ProcessSet) -> str:
    """Call after the arguments are validated (a refused call must not consume a number)."""
    return name or f"noname.{handles.unnamed_count(prefix, ps.process_set_id)}"


def _name(prefix: str, name: str | None, ps: ProcessSet) -> str:
    return f"{prefix}.{_base(prefix, name, ps)}"


def _grouped(prefix: str, name: str | None, ps: ProcessSet, tensors, start_one) -> tuple[int, GroupHandle]:
    """One op per tensor, named ``<base>_<i>`` (fused by the engine); the handle yields the list."""
    hid = handles.next_id()
    base = _base(prefix, name, ps)
    return hid, GroupHandle(f"{prefix}.{base}", [start_one(t, f"{base}_{i}")[1] for i, t in enumerate(tensors)])


def _submit(
    worker,
    name: str,
    kind: Kind,
    described: tuple[str, int],
    fuse: int,
    aux: int,
    finish: Callable[[object], object] | None = None,
    wake: bool = True,
    **fields,
) -> Handle:
    handle = Handle(name, finish)
    desc, sig = described
    worker.submit(Op(name, kind, Announcement(_digest(name), sig, fuse, aux), desc, handle, **fields), wake)
    return handle


# A training loop submits the same names and shapes every step: describe each once.
_digest = functools.lru_cache(maxsize=8192)(digest)
_fuse = functools.lru_cache(maxsize=1024)(fuse_key)


@functools.lru_cache(maxsize=8192)
def _described(kind: Kind, dtype: str, shape: tuple, op: str = "", scales=(1.0, 1.0), root: int = -1):
    """(readable description, signature digest). Allgather and alltoall may differ in the first
    dimension, so it stays out of their signature (the rank count of the shape stays in)."""
    desc = describe(kind, dtype, shape, op, scales, root)
    signed = (len(shape), *shape[1:]) if kind in (Kind.ALLGATHER, Kind.ALLTOALL) else shape
    return desc, digest(describe(kind, dtype, signed, op, scales, root))


def _same(tensor: torch.Tensor) -> Callable[[object], object]:
    """In-place ops return the caller's own tensor object (the engine wrote a detached alias)."""
    return lambda _: tensor


def _finish_as(dtype: torch.dtype) -> Callable[[object], object]:
    return lambda t: t if t.dtype == dtype else t.to(dtype)


# -- allreduce -------------------------------------------------------------------------------
def allreduce_start(
    tensors: Sequence[torch.Tensor],
    outputs: Sequence[torch.Tensor] | None,
    name: str | None,
    op: ReduceOp,
    pre: float,
    post: float,
    ps: ProcessSet,
    grouped: bool,
    shared: bool = False,
    wake: bool = True,
) -> tuple[int, Handle]:
    """Reduce each tensor (in place into ``outputs`` when given); a grouped call submits one op
    per tensor (``<name>_<i>``), fused by the engine, and its handle yields the list. ``wake=False``
    for a caller that will wait on the handle itself (see ``SetWorker.submit``)."""
    prefix = "grouped_allreduce" if grouped else "allreduce"
    worker = process_set_worker(ps, prefix)
    kind = Kind.ADASUM if op == Adasum else Kind.ALLREDUCE
    wired = [to_wire(t, prefix) for t in tensors]
    if kind is Kind.ADASUM:
        for w in wired:
            _check_adasum(ps, w)
    hid = handles.next_id()
    base = _name(prefix, name, ps)
    parts = []
    for i, (t, w) in enumerate(zip(tensors, wired)):
        n = f"{base}_{i}" if grouped else base
        out = outputs[i].detach() if outputs is not None else None  # same storage, no autograd
        desc = _described(kind, dtype_name(t.dtype), tuple(t.shape), op.name, (pre, post))
        fuse = _fuse(kind, torch.float64 if kind is Kind.ADASUM else w.dtype, op, (pre, post), shared)
        parts.append(
            _submit(
                worker,
                n,
                kind,
                desc,
                fuse,
                w.numel(),
                _same(outputs[i]) if out is not None else _finish_as(t.dtype),
                wake,
                tensor=w,
                output=out,
                pre=pre,
                post=post,
            )
        )
    if grouped:
        return hid, GroupHandle(base, parts)
    return hid, parts[0]


def _check_adasum(ps: ProcessSet, w: torch.Tensor) -> None:
    n = len(ps.ranks)
    if n & (n - 1):
        raise NotImplementedError("Running Adasum with non-power of 2 ranks is not supported yet.")
    if not w.is_floating_point():
        raise HorovodError("Adasum needs floating-point tensors")


# -- allgather, broadcast, alltoall, reducescatter, barrier -----------------------------------
def allgather_start(tensor: torch.Tensor, name: str | None, ps: ProcessSet, prefix: str = "allgather"):
    hid = handles.next_id()
    w = to_wire(tensor, "allgather")
    if w.dim() == 0:
        w = w.reshape(1)
    desc = _described(Kind.ALLGATHER, dtype_name(tensor.dtype), tuple(w.shape))
    h = _submit(
        process_set_worker(ps, "allgather"),
        _name(prefix, name, ps),
        Kind.ALLGATHER,
        desc,
        _fuse(Kind.ALLGATHER, w.dtype, 0, (1.0, 1.0)),
        w.shape[0],
        _finish_as(tensor.dtype),
        tensor=w,
    )
    return hid, h


def grouped_allgather_start(tensors, name: str | None, ps: ProcessSet):
    prefix = "grouped_allgather"
    return _grouped(prefix, name, ps, tensors, lambda t, n: allgather_start(t, n, ps, prefix))


def broadcast_start(tensor: torch.Tensor, root_rank: int, name: str | None, ps: ProcessSet, inplace: bool):
    process_set_worker(ps, "broadcast")
    if root_rank not in ps.ranks:
        raise HorovodError(f"broadcast root_rank={root_rank} is not a member of {ps}")
    hid = handles.next_id()
    w = to_wire(tensor, "broadcast")
    if not inplace and w.data_ptr() == tensor.data_ptr():
        w = w.clone()  # an out-of-place broadcast must not write into the caller's tensor
    desc = _described(Kind.BROADCAST, dtype_name(tensor.dtype), tuple(tensor.shape), root=root_rank)
    h = _submit(
        process_set_worker(ps, "broadcast"),
        _name("broadcast", name, ps),
        Kind.BROADCAST,
        desc,
        _fuse(Kind.BROADCAST, w.dtype, 0, (1.0, 1.0)),
        0,
        _same(tensor) if inplace else _finish_as(tensor.dtype),
        tensor=w,
        output=tensor.detach() if inplace else None,
        root=ps.ranks.index(root_rank),
    )
    return hid, h


def alltoall_start(tensor: torch.Tensor, splits, name: str | None, ps: ProcessSet):
    process_set_worker(ps, "alltoall")
    w = to_wire(tensor, "alltoall")
    n = len(ps.ranks)
    rows = w.shape[0] if w.dim() else 0
    if splits is None:
        if rows % n:
            raise ValueError(
                f"alltoall: first dimension {rows} is not divisible by the set size {n}\n"
                "HINT: pass splits= (rows per destination rank)"
            )
        splits = [rows // n] * n
    if isinstance(splits, torch.Tensor):
        if splits.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"alltoall: splits must be an int32 or int64 tensor, got {splits.dtype}")
        splits = splits.tolist()
    splits = [int(s) for s in splits]
    if len(splits) != n or any(s < 0 for s in splits) or sum(splits) != rows:
        raise ValueError(
            f"alltoall: splits {splits} must be {n} non-negative counts (one per rank of the set) summing to "
            f"the first dimension {rows}"
        )
    hid = handles.next_id()
    desc = _described(Kind.ALLTOALL, dtype_name(tensor.dtype), tuple(w.shape))
    dtype = tensor.dtype
    h = _submit(
        process_set_worker(ps, "alltoall"),
        _name("alltoall", name, ps),
        Kind.ALLTOALL,
        desc,
        _fuse(Kind.ALLTOALL, w.dtype, 0, (1.0, 1.0)),
        rows,
        lambda res: (res[0] if res[0].dtype == dtype else res[0].to(dtype), res[1]),
        tensor=w,
        splits=splits,
    )
    return hid, h


def reducescatter_start(tensor, name, op: ReduceOp, ps: ProcessSet, pre: float, post: float, prefix="reducescatter"):
    if op == Adasum:
        raise HorovodError("reducescatter does not support Adasum")
    w = to_wire(tensor, "reducescatter")
    if w.dim() == 0:
        raise HorovodError("Process-set rank zero tried to reducescatter a rank-zero tensor.")
    hid = handles.next_id()
    desc = _described(Kind.REDUCESCATTER, dtype_name(tensor.dtype), tuple(tensor.shape), op.name, (pre, post))
    h = _submit(
        process_set_worker(ps, "reducescatter"),
        _name(prefix, name, ps),
        Kind.REDUCESCATTER,
        desc,
        _fuse(Kind.REDUCESCATTER, w.dtype, op, (pre, post)),
        w.numel(),
        _finish_as(tensor.dtype),
        tensor=w,
        pre=pre,
        post=post,
    )
    return hid, h


def grouped_reducescatter_start(tensors, name, op: ReduceOp, ps: ProcessSet, pre: float, post: float):
    prefix = "grouped_reducescatter"
    return _grouped(prefix, name, ps, tensors, lambda t, n: reducescatter_start(t, n, op, ps, pre, post, prefix))


def barrier_start(ps: ProcessSet):
    hid = handles.next_id()
    desc = _described(Kind.BARRIER, "", ())  # Horovod's fixed name: one barrier per set at a time
    fuse = _fuse(Kind.BARRIER, torch.int64, 0, (1.0, 1.0))
    return hid, _submit(process_set_worker(ps, "barrier"), "barrier.noname", Kind.BARRIER, desc, fuse, 0)


def alloc_start(numels: list[int], dtypes: list[torch.dtype], name: str, ps: ProcessSet) -> Handle:
    """Every member of ``ps``, same order: persistent buffers from the set's ``comm.alloc`` (shared
    memory under ``shm``), allocated by the set's engine thread, which owns the communicator."""
    worker = process_set_worker(ps, "alloc")
    full = f"alloc.{name}"
    sig = digest(f"alloc|{numels}|{dtypes}")
    fuse = _fuse(Kind.PROCESS_SET, torch.int64, 0, (1.0, 1.0))
    desc = json.dumps({"kind": "PROCESS_SET", "dtype": "", "shape": numels, "op": "alloc", "scales": [], "root": -1})
    h = Handle(full)
    comm = worker.comm
    action = lambda: [comm.alloc(n, dt) for n, dt in zip(numels, dtypes)]  # noqa: E731
    worker.submit(Op(full, Kind.PROCESS_SET, Announcement(_digest(full), sig, fuse, 0), desc, h, action=action))
    return h


def join_start() -> Handle:
    ctx = context("join()")
    h = Handle("join")
    ctx.engine.worker(0).join(h)
    return h
