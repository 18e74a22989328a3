"""Horovod's tensor ops over our communicators: allreduce, allgather, broadcast, alltoall,
reducescatter, their in-place (``_``), async (``_async``) and grouped forms, plus ``poll``,
``synchronize``, ``join`` and ``barrier``.

Every op is called by every member of its process set, in the same order (Horovod matched
ops by name instead; see ``negotiation`` for why we need the order and what it buys). An op
first agrees with the other ranks (blocking, short), then starts its transfer and returns;
``_async`` forms hand back an integer handle for ``poll``/``synchronize``, the others wait.
Errors follow Horovod: ranks that disagree about an op (shape, dtype, reduce op, root) all
raise :class:`HorovodInternalError` from ``synchronize``, naming both sides and call sites.

Dtypes: float16/32/64, bfloat16, int32/64 natively; uint8/int8/int16 travel as int32 (values
round-trip exactly; sums wrap as the narrow type would). Integer ``Average`` truncates.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Sequence

import torch

from collectives import CollectivesError
from collectives import ReduceOp as CommOp
from collectives.types import SUPPORTED_DTYPES

from . import timeline as _timeline
from .basics import Adasum, Average, Max, Min, Product, ReduceOp, Sum, context
from .compression import Compression
from .exceptions import HorovodError, HorovodInternalError
from .process_sets import ProcessSet, global_process_set

_WIRE = {torch.uint8: torch.int32, torch.int8: torch.int32, torch.int16: torch.int32}
_COMM = {Sum: CommOp.SUM, Average: CommOp.AVG, Min: CommOp.MIN, Max: CommOp.MAX, Product: CommOp.PROD}
_names = itertools.count()


# -- handles ---------------------------------------------------------------------------------
class _Pending:
    """One async op: the transfers in flight and what turns them into the user's result."""

    def __init__(
        self,
        name: str,
        op: str,
        works: list,
        finish: Callable[[], object] | None,
        error: Exception | None = None,
        t_start: float = 0.0,
        t_agreed: float = 0.0,
    ):
        self.name, self.op, self.works, self.finish, self.error = name, op, works, finish, error
        self.t_start, self.t_agreed = t_start, t_agreed

    def done(self) -> bool:
        return self.error is not None or all(w.is_completed() for w in self.works)

    def result(self):
        if self.error is not None:
            raise self.error
        try:
            for w in self.works:
                w.wait()
        except CollectivesError as exc:
            raise HorovodInternalError(f"{self.op} {self.name!r} failed: {exc}") from exc
        out = self.finish() if self.finish is not None else None
        tl = _timeline.active()
        if tl is not None:
            tl.record(self.name, self.op, self.t_start, self.t_agreed, time.perf_counter(), {})
        return out


_handles: dict[int, _Pending] = {}
_handle_ids = itertools.count(1)
_handle_lock = threading.Lock()


def _register(p: _Pending) -> int:
    with _handle_lock:
        h = next(_handle_ids)
        _handles[h] = p
    return h


def forget_handles() -> None:
    with _handle_lock:
        _handles.clear()


def poll(handle: int) -> bool:
    """True once the op behind ``handle`` finished (``synchronize`` will not block). Never blocks."""
    p = _handles.get(handle)
    if p is None:
        raise HorovodError(f"poll({handle!r}): unknown handle (already synchronized?)")
    return p.done()


def synchronize(handle: int):
    """Wait for the op behind ``handle`` and return its output (a tensor, or a tuple for alltoall)."""
    with _handle_lock:
        p = _handles.pop(handle, None)
    if p is None:
        return None
    return p.result()


# -- helpers ---------------------------------------------------------------------------------
def _resolve_op(op, average) -> ReduceOp:
    if op is not None and average is not None:
        raise ValueError("The op parameter supersedes average. Please provide only one of them.")
    if op is None:
        return Average if average is None or average else Sum
    try:
        return ReduceOp(op)
    except ValueError:
        raise HorovodError(f"unknown reduce op {op!r}; use hvd.Average, Sum, Min, Max, Product or Adasum") from None


def _wire(t: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise HorovodError(f"{what} expects a torch.Tensor, got {type(t).__name__}")
    if t.is_sparse:
        raise HorovodError(
            f"{what} got a sparse tensor\nHINT: sparse allreduce is not supported; "
            "use DistributedOptimizer(sparse_as_dense=True) or .to_dense()"
        )
    if t.dtype in _WIRE:
        return t.to(_WIRE[t.dtype])
    if t.dtype not in SUPPORTED_DTYPES:
        raise HorovodError(
            f"{what}: dtype {t.dtype} is not supported; supported: "
            f"{', '.join(map(str, SUPPORTED_DTYPES + tuple(_WIRE)))}"
        )
    return t.contiguous()


def _set(process_set: ProcessSet):
    context("collective ops")
    if not isinstance(process_set, ProcessSet):
        raise HorovodError(f"process_set must be a hvd.ProcessSet, got {type(process_set).__name__}")
    return process_set


def _start(name: str | None, opname: str, ps: ProcessSet, fp_args: tuple, launch, *, dim0: int = 0, splits=None) -> int:
    """Agree (blocking), then ``launch(agreement, channel) -> (works, finish)``; returns a handle.
    A disagreement is kept for ``synchronize`` to raise, as Horovod reports it there."""
    ch = _set(ps).channel(opname)
    name = name or f"{opname}.noname.{next(_names)}"
    t0 = time.perf_counter()
    try:
        fp = ch.fingerprint(opname, *fp_args, name=name)
        ag = ch.negotiate(fp, dim0=dim0, splits=splits)
        works, finish = launch(ag, ch)
    except HorovodInternalError as exc:
        return _register(_Pending(name, opname, [], None, exc))
    except CollectivesError as exc:
        return _register(_Pending(name, opname, [], None, HorovodInternalError(f"{opname} {name!r}: {exc}")))
    return _register(_Pending(name, opname, works, finish, None, t0, time.perf_counter()))


def _dtype_name(tensors: Sequence[torch.Tensor]) -> str:
    names = sorted({str(t.dtype).removeprefix("torch.") for t in tensors})
    return names[0] if len(names) == 1 else "mixed:" + "+".join(names)


# -- allreduce -------------------------------------------------------------------------------
def _allreduce_start(
    tensors: Sequence[torch.Tensor],
    outputs: Sequence[torch.Tensor] | None,
    name,
    op,
    prescale_factor: float,
    postscale_factor: float,
    process_set: ProcessSet,
) -> int:
    """Reduce ``tensors``; write into ``outputs`` (in place) or return new tensors (None).
    Tensors of one dtype travel fused in one flat buffer."""
    what = "allreduce" if len(tensors) == 1 else "grouped_allreduce"
    wired = [_wire(t, what) for t in tensors]
    if op == Adasum:
        return _adasum_start(tensors, wired, outputs, name, process_set)
    comm_op = _COMM[op]
    # Fuse per wire dtype, in order of first appearance: parts = [(dtype, [indices])].
    order: dict[torch.dtype, list[int]] = {}
    for i, w in enumerate(wired):
        order.setdefault(w.dtype, []).append(i)
    parts = []
    for dtype, idx in order.items():
        n = sum(wired[i].numel() for i in idx)
        cop = CommOp.SUM if (comm_op is CommOp.AVG and not dtype.is_floating_point) else comm_op
        parts.append((dtype, idx, n, cop))
    if len({p[3] for p in parts}) > 1:
        raise HorovodError(
            f"{what}: integer Average mixed with float tensors in one group\n"
            "HINT: group integer and float tensors separately"
        )
    extra = ";".join(
        [
            f"op={parts[0][3]}",
            f"hop={op.name}",
            "parts=" + ",".join(f"{str(d).removeprefix('torch.')}:{n}" for d, _, n, _ in parts),
        ]
    )

    def launch(ag, ch):
        works, flats = [], []
        for _dtype, idx, _n, cop in parts:
            if len(idx) == 1 and outputs is not None and wired[idx[0]] is tensors[idx[0]]:
                flat = tensors[idx[0]].view(-1)  # in place, already on the wire: no copy
            elif len(idx) == 1:
                flat = (
                    wired[idx[0]].reshape(-1).clone() if wired[idx[0]] is tensors[idx[0]] else wired[idx[0]].reshape(-1)
                )
            else:
                flat = torch.cat([wired[i].reshape(-1) for i in idx])
            if prescale_factor != 1.0:
                flat.mul_(prescale_factor)
            flats.append(flat)
            works.append(ch.data.allreduce(flat, cop, async_op=True))

        def finish():
            results: list = [None] * len(tensors)
            for (dtype, idx, _n, _cop), flat in zip(parts, flats):
                if op == Average and not dtype.is_floating_point:
                    flat.div_(ch.size, rounding_mode="trunc")
                if postscale_factor != 1.0:
                    flat.mul_(postscale_factor)
                for i, piece in zip(idx, flat.split([wired[i].numel() for i in idx])):
                    res = piece.view(tensors[i].shape)
                    if outputs is not None:
                        if res.data_ptr() != outputs[i].data_ptr():
                            outputs[i].copy_(res)
                        results[i] = outputs[i]
                    else:
                        results[i] = res if res.dtype == tensors[i].dtype else res.to(tensors[i].dtype)
            return results

        return works, finish

    return _start(name, what, process_set, ([t.shape for t in tensors], _dtype_name(tensors), extra), launch)


def _adasum_start(tensors, wired, outputs, name, process_set) -> int:
    """Adasum (Maleki et al.): pairwise ``(1 - a.b/2|a|^2) a + (1 - a.b/2|b|^2) b`` up a binary tree
    of ranks (0+1, 2+3, then the pairs), per tensor, as Horovod's CPU path computes it. Done here
    by an allgather and the same tree on every rank; power-of-two set sizes only, as in Horovod."""
    ps = _set(process_set)
    n = ps.size()
    if n & (n - 1):
        raise NotImplementedError("Running Adasum with non-power of 2 ranks is not supported yet.")
    if any(not w.is_floating_point() for w in wired):
        raise HorovodError("Adasum needs floating-point tensors")
    flats = [w.reshape(-1).to(torch.float64) for w in wired]
    flat = torch.cat(flats)

    def launch(ag, ch):
        out = torch.empty(ch.size, flat.numel(), dtype=flat.dtype)
        work = ch.data.allgather(list(out.unbind(0)), flat, async_op=True)

        def finish():
            results = []
            for i, piece in enumerate(out.split([f.numel() for f in flats], dim=1)):
                vals = list(piece.unbind(0))
                while len(vals) > 1:
                    vals = [_adasum_pair(vals[k], vals[k + 1]) for k in range(0, len(vals), 2)]
                res = vals[0].view(tensors[i].shape).to(tensors[i].dtype)
                if outputs is not None:
                    outputs[i].copy_(res)
                    res = outputs[i]
                results.append(res)
            return results

        return [work], finish

    return _start(name, "adasum", ps, ([t.shape for t in tensors], _dtype_name(tensors), "op=adasum"), launch)


def _adasum_pair(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    dot, na, nb = torch.dot(a, b), torch.dot(a, a), torch.dot(b, b)
    ca = 1.0 - dot / (2 * na) if na > 0 else 1.0
    cb = 1.0 - dot / (2 * nb) if nb > 0 else 1.0
    return ca * a + cb * b


def allreduce_async(
    tensor, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0, process_set=global_process_set
) -> int:
    """All members: start reducing a copy of ``tensor`` (default op Average); returns a handle."""
    op = _resolve_op(op, average)
    h = _allreduce_start([tensor], None, name, op, prescale_factor, postscale_factor, process_set)
    return _unwrap(h)


def allreduce_async_(
    tensor, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0, process_set=global_process_set
) -> int:
    """All members: start reducing ``tensor`` in place; returns a handle."""
    op = _resolve_op(op, average)
    return _unwrap(_allreduce_start([tensor], [tensor], name, op, prescale_factor, postscale_factor, process_set))


def allreduce(
    tensor,
    average=None,
    name=None,
    compression=Compression.none,
    op=None,
    prescale_factor=1.0,
    postscale_factor=1.0,
    process_set=global_process_set,
) -> torch.Tensor:
    """All members: the reduction of ``tensor`` over the set (a new tensor; blocks).
    Differentiable: the gradient is allreduced with the same op."""
    op = _resolve_op(op, average)
    compressed, ctx = compression.compress(tensor)
    out = _AllreduceFn.apply(compressed, op, name, prescale_factor, postscale_factor, process_set)
    return compression.decompress(out, ctx)


def allreduce_(
    tensor, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0, process_set=global_process_set
) -> torch.Tensor:
    """All members: reduce ``tensor`` in place (blocks); returns it."""
    return synchronize(allreduce_async_(tensor, average, name, op, prescale_factor, postscale_factor, process_set))


class _AllreduceFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, op, name, pre, post, ps):
        ctx.args = (op, pre, post, ps)
        return synchronize(_unwrap(_allreduce_start([tensor.detach()], None, name, op, pre, post, ps)))

    @staticmethod
    def backward(ctx, grad):
        op, pre, post, ps = ctx.args
        return (
            allreduce(grad, op=op, prescale_factor=pre, postscale_factor=post, process_set=ps),
            None,
            None,
            None,
            None,
            None,
        )


def _unwrap(h: int) -> int:
    """Single-tensor forms return the tensor, not a one-element list."""
    p = _handles.get(h)
    if p is not None and p.finish is not None:
        inner = p.finish
        p.finish = lambda: inner()[0]
    return h


def grouped_allreduce_async(
    tensors, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0, process_set=global_process_set
) -> int:
    """All members: start reducing copies of ``tensors`` as one fused op; returns a handle."""
    op = _resolve_op(op, average)
    return _allreduce_start(list(tensors), None, name, op, prescale_factor, postscale_factor, process_set)


def grouped_allreduce_async_(
    tensors, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0, process_set=global_process_set
) -> int:
    op = _resolve_op(op, average)
    tensors = list(tensors)
    return _allreduce_start(tensors, tensors, name, op, prescale_factor, postscale_factor, process_set)


def grouped_allreduce(
    tensors,
    average=None,
    name=None,
    compression=Compression.none,
    op=None,
    prescale_factor=1.0,
    postscale_factor=1.0,
    process_set=global_process_set,
) -> list:
    pairs = [compression.compress(t) for t in tensors]
    outs = synchronize(
        grouped_allreduce_async(
            [c for c, _ in pairs], average, name, op, prescale_factor, postscale_factor, process_set
        )
    )
    return [compression.decompress(o, ctx) for o, (_, ctx) in zip(outs, pairs)]


def grouped_allreduce_(
    tensors, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0, process_set=global_process_set
) -> list:
    return synchronize(
        grouped_allreduce_async_(tensors, average, name, op, prescale_factor, postscale_factor, process_set)
    )


def sparse_allreduce_async(tensor, name, op, process_set=global_process_set):
    raise HorovodError("sparse allreduce is not supported\nHINT: use DistributedOptimizer(sparse_as_dense=True)")


# -- allgather -------------------------------------------------------------------------------
def _allgather_start(tensor, name, process_set) -> int:
    w = _wire(tensor, "allgather")
    if w.dim() == 0:
        w = w.reshape(1)
    rest = tuple(w.shape[1:])

    def launch(ag, ch):
        out = torch.empty((sum(ag.dims), *rest), dtype=w.dtype)
        work = ch.data.allgather(list(out.split(ag.dims)), w, async_op=True)
        return [work], lambda: out if out.dtype == tensor.dtype else out.to(tensor.dtype)

    return _start(
        name, "allgather", process_set, ([rest], _dtype_name([tensor]), f"ndim={w.dim()}"), launch, dim0=w.shape[0]
    )


def allgather_async(tensor, name=None, process_set=global_process_set) -> int:
    """All members: start concatenating every member's ``tensor`` along dim 0 (first dims may differ)."""
    return _allgather_start(tensor, name, process_set)


def allgather(tensor, name=None, process_set=global_process_set) -> torch.Tensor:
    """All members: every member's ``tensor`` concatenated along dim 0, in set-rank order (blocks)."""
    return _AllgatherFn.apply(tensor, name, process_set)


class _AllgatherFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, name, ps):
        ctx.dim, ctx.ps = (tensor.shape[0] if tensor.dim() else 1), ps
        return synchronize(_allgather_start(tensor.detach(), name, ps))

    @staticmethod
    def backward(ctx, grad):
        reduced = allreduce(grad, op=Average, process_set=ctx.ps)
        dims = allgather(torch.tensor([ctx.dim], dtype=torch.int64), process_set=ctx.ps)
        offset = int(dims[: ctx.ps.rank()].sum())
        return reduced.narrow(0, offset, ctx.dim), None, None


def grouped_allgather_async(tensors, name=None, process_set=global_process_set) -> int:
    """All members: allgather each tensor (issued back to back); the handle yields a list."""
    hs = [_allgather_start(t, f"{name}.{i}" if name else None, process_set) for i, t in enumerate(tensors)]
    return _register(
        _Pending(name or "grouped_allgather", "grouped_allgather", [], lambda: [synchronize(h) for h in hs])
    )


def grouped_allgather(tensors, name=None, process_set=global_process_set) -> list:
    return synchronize(grouped_allgather_async(tensors, name, process_set))


# -- broadcast -------------------------------------------------------------------------------
def _broadcast_start(tensor, root_rank, name, process_set, inplace: bool) -> int:
    ps = _set(process_set)
    if root_rank not in ps.ranks:
        raise HorovodError(f"broadcast root_rank={root_rank} is not a member of {ps}")
    root = ps.ranks.index(root_rank)
    w = _wire(tensor, "broadcast")

    def launch(ag, ch):
        buf = w if (inplace or w is not tensor) else w.clone()
        work = ch.data.broadcast(buf, root, async_op=True)

        def finish():
            if inplace:
                if buf.data_ptr() != tensor.data_ptr():
                    tensor.copy_(buf)
                return tensor
            return buf if buf.dtype == tensor.dtype else buf.to(tensor.dtype)

        return [work], finish

    return _start(name, "broadcast", ps, ([tensor.shape], _dtype_name([tensor]), f"root={root_rank}"), launch)


def broadcast_async(tensor, root_rank, name=None, process_set=global_process_set) -> int:
    return _broadcast_start(tensor, root_rank, name, process_set, False)


def broadcast_async_(tensor, root_rank, name=None, process_set=global_process_set) -> int:
    return _broadcast_start(tensor, root_rank, name, process_set, True)


def broadcast(tensor, root_rank, name=None, process_set=global_process_set) -> torch.Tensor:
    """All members: a copy of global rank ``root_rank``'s ``tensor`` (blocks)."""
    return _BroadcastFn.apply(tensor, root_rank, name, process_set)


def broadcast_(tensor, root_rank, name=None, process_set=global_process_set) -> torch.Tensor:
    """All members: overwrite ``tensor`` with ``root_rank``'s (blocks); returns it."""
    return synchronize(broadcast_async_(tensor, root_rank, name, process_set))


class _BroadcastFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, root_rank, name, ps):
        ctx.root, ctx.ps = root_rank, ps
        return synchronize(broadcast_async(tensor.detach(), root_rank, name, ps))

    @staticmethod
    def backward(ctx, grad):
        reduced = allreduce(grad, op=Average, process_set=ctx.ps)
        if context().world.rank != ctx.root:
            reduced = reduced * 0
        return reduced, None, None, None


# -- alltoall --------------------------------------------------------------------------------
def alltoall_async(tensor, splits=None, name=None, process_set=global_process_set) -> int:
    """All members: start sending ``splits[r]`` first-dim rows of ``tensor`` to set rank r; the
    handle yields ``(output, received_splits)``."""
    ps = _set(process_set)
    w = _wire(tensor, "alltoall")
    n = ps.size()
    rows = w.shape[0] if w.dim() else 0
    if splits is None:
        if rows % n:
            raise HorovodError(
                f"alltoall: first dimension {rows} is not divisible by the set size {n}\n"
                "HINT: pass splits= (rows per destination rank)"
            )
        splits = [rows // n] * n
    splits = [int(s) for s in (splits.tolist() if isinstance(splits, torch.Tensor) else splits)]
    if len(splits) != n or any(s < 0 for s in splits) or sum(splits) != rows:
        raise HorovodError(
            f"alltoall: splits {splits} must be {n} non-negative counts summing to the first dimension {rows}"
        )
    rest = tuple(w.shape[1:])

    def launch(ag, ch):
        recv = [ag.splits[src][ch.rank] for src in range(n)]
        out = torch.empty((sum(recv), *rest), dtype=w.dtype)
        work = ch.data.all_to_all(list(out.split(recv)), list(w.split(splits)), async_op=True)

        def finish():
            res = out if out.dtype == tensor.dtype else out.to(tensor.dtype)
            return res, torch.tensor(recv, dtype=torch.int32)

        return [work], finish

    return _start(name, "alltoall", ps, ([rest], _dtype_name([tensor]), f"ndim={w.dim()}"), launch, splits=splits)


def alltoall(tensor, splits=None, name=None, process_set=global_process_set):
    """All members: the rows every member sent here, in set-rank order (blocks). With ``splits``,
    returns ``(output, received_splits)`` as Horovod does; without, just the output."""
    out, received = _AlltoallFn.apply(tensor, splits, name, process_set)
    return out if splits is None else (out, received)


class _AlltoallFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, splits, name, ps):
        out, received = synchronize(alltoall_async(tensor.detach(), splits, name, ps))
        ctx.received, ctx.ps = received, ps
        ctx.mark_non_differentiable(received)
        return out, received

    @staticmethod
    def backward(ctx, grad, _dead):
        back, _ = alltoall(grad.contiguous(), splits=ctx.received, process_set=ctx.ps)
        return back, None, None, None


# -- reducescatter ---------------------------------------------------------------------------
def _reducescatter_start(tensor, name, op, process_set, prescale_factor, postscale_factor) -> int:
    ps = _set(process_set)
    op = _resolve_op(op, None)
    if op == Adasum:
        raise HorovodError("reducescatter does not support Adasum")
    w = _wire(tensor, "reducescatter")
    if w.dim() == 0:
        raise HorovodError("reducescatter of a rank-zero tensor: give it a first dimension to scatter")
    n, rows = ps.size(), w.shape[0]
    counts = [rows // n + (1 if r < rows % n else 0) for r in range(n)]  # Horovod's split rule
    cop = _COMM[op]
    if cop is CommOp.AVG and not w.is_floating_point():
        cop = CommOp.SUM

    def launch(ag, ch):
        src = w * prescale_factor if prescale_factor != 1.0 else w
        out = torch.empty((counts[ch.rank], *w.shape[1:]), dtype=w.dtype)
        work = ch.data.reduce_scatter(out, list(src.split(counts)), cop, async_op=True)

        def finish():
            if op == Average and not out.is_floating_point():
                out.div_(n, rounding_mode="trunc")
            if postscale_factor != 1.0:
                out.mul_(postscale_factor)
            return out if out.dtype == tensor.dtype else out.to(tensor.dtype)

        return [work], finish

    return _start(name, "reducescatter", ps, ([tensor.shape], _dtype_name([tensor]), f"op={op.name}"), launch)


def reducescatter_async(
    tensor, name=None, op=Average, process_set=global_process_set, prescale_factor=1.0, postscale_factor=1.0
) -> int:
    """All members: start reducing ``tensor`` and keeping this rank's block of first-dim rows
    (the first ``rows % size`` ranks get one extra row, as in Horovod)."""
    return _reducescatter_start(tensor, name, op, process_set, prescale_factor, postscale_factor)


def reducescatter(
    tensor,
    name=None,
    compression=Compression.none,
    op=Average,
    process_set=global_process_set,
    prescale_factor=1.0,
    postscale_factor=1.0,
) -> torch.Tensor:
    compressed, ctx = compression.compress(tensor)
    out = synchronize(_reducescatter_start(compressed, name, op, process_set, prescale_factor, postscale_factor))
    return compression.decompress(out, ctx)


def grouped_reducescatter_async(
    tensors, name=None, op=Average, process_set=global_process_set, prescale_factor=1.0, postscale_factor=1.0
) -> int:
    hs = [
        _reducescatter_start(t, f"{name}.{i}" if name else None, op, process_set, prescale_factor, postscale_factor)
        for i, t in enumerate(tensors)
    ]
    return _register(
        _Pending(name or "grouped_reducescatter", "grouped_reducescatter", [], lambda: [synchronize(h) for h in hs])
    )


def grouped_reducescatter(
    tensors,
    name=None,
    compression=Compression.none,
    op=Average,
    process_set=global_process_set,
    prescale_factor=1.0,
    postscale_factor=1.0,
) -> list:
    pairs = [compression.compress(t) for t in tensors]
    outs = synchronize(
        grouped_reducescatter_async([c for c, _ in pairs], name, op, process_set, prescale_factor, postscale_factor)
    )
    return [compression.decompress(o, ctx) for o, (_, ctx) in zip(outs, pairs)]


# -- join and barrier ------------------------------------------------------------------------
def join(device: int = -1) -> int:
    """All ranks, each once it ran out of data: until every rank has joined, answer the others'
    allreduces with zeros (Average still divides by the full size, as in Horovod). Returns the
    global rank that joined last. Other ops while a rank has joined raise on every rank."""
    ch = context("join()").world
    try:
        return ch.join()
    except CollectivesError as exc:
        raise HorovodInternalError(f"join failed: {exc}") from exc


def barrier(process_set=global_process_set) -> None:
    """All members: return once every member has entered the barrier."""
    synchronize(_start(None, "barrier", process_set, ([], "none"), lambda ag, ch: ([], None)))
