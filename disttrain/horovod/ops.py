"""Horovod's tensor ops: allreduce, allgather, broadcast, alltoall, reducescatter, their in-place
(``_``), async (``_async``) and grouped forms, sparse allreduce, ``join`` and ``barrier``.

Every member of the process set submits the op under the same *name* (given, or Horovod's
``<kind>.noname.<n>``), in any order and from any thread; the engine runs it once all of them
have (see ``engine``). ``_async`` forms return an integer handle for ``poll``/``synchronize``;
the others wait. Errors follow Horovod: ranks that disagree about an op (shape, dtype, reduce
op, root) all raise :class:`HorovodInternalError` from ``synchronize``, and the next op works;
two ops with one name in flight raise ``ValueError`` at submission, on the rank that did it.

Dtypes: float16/32/64, bfloat16, int32/64 natively; uint8/int8/int16 travel as int32 (values
round-trip exactly; sums wrap as the narrow type would). Integer ``Average`` truncates.
"""

from __future__ import annotations

import torch

from . import handles
from .autograd import (
    AllgatherFn,
    AllreduceFn,
    AlltoallFn,
    BroadcastFn,
    GroupedAllgatherFn,
    GroupedAllreduceFn,
    GroupedReducescatterFn,
    ReducescatterFn,
)
from .compression import Compression
from .handles import poll, synchronize
from .process_sets import ProcessSet, global_process_set
from .reduce_op import Average
from .submit import (
    allgather_start,
    allreduce_start,
    alltoall_start,
    barrier_start,
    broadcast_start,
    grouped_allgather_start,
    grouped_reducescatter_start,
    join_start,
    reducescatter_start,
    resolve_op,
)

__all__ = ["poll", "synchronize"]  # re-exported from handles


def _register(started) -> int:
    hid, h = started
    return handles.register(h, hid)


# -- allreduce -------------------------------------------------------------------------------
def allreduce_async(
    tensor, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0, process_set=global_process_set
) -> int:
    """All members: start reducing a copy of ``tensor`` (default op Average); returns a handle."""
    op = resolve_op(op, average)
    return _register(allreduce_start([tensor], None, name, op, prescale_factor, postscale_factor, process_set, False))


def allreduce_async_(
    tensor, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0, process_set=global_process_set
) -> int:
    """All members: start reducing ``tensor`` in place; returns a handle."""
    op = resolve_op(op, average)
    return _register(
        allreduce_start([tensor], [tensor], name, op, prescale_factor, postscale_factor, process_set, False)
    )


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
    op = resolve_op(op, average)
    compressed, ctx = compression.compress(tensor)
    out = AllreduceFn.apply(compressed, op, name, prescale_factor, postscale_factor, process_set)
    return compression.decompress(out, ctx)


def allreduce_(
    tensor, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0, process_set=global_process_set
) -> torch.Tensor:
    """All members: reduce ``tensor`` in place (blocks); returns it."""
    return synchronize(allreduce_async_(tensor, average, name, op, prescale_factor, postscale_factor, process_set))


def grouped_allreduce_async(
    tensors, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0, process_set=global_process_set
) -> int:
    """All members: start reducing copies of ``tensors`` (fused by the engine); returns a handle."""
    op = resolve_op(op, average)
    return _register(
        allreduce_start(list(tensors), None, name, op, prescale_factor, postscale_factor, process_set, True)
    )


def grouped_allreduce_async_(
    tensors, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0, process_set=global_process_set
) -> int:
    op = resolve_op(op, average)
    tensors = list(tensors)
    return _register(allreduce_start(tensors, tensors, name, op, prescale_factor, postscale_factor, process_set, True))


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
    op = resolve_op(op, average)
    outs = GroupedAllreduceFn.apply(op, name, prescale_factor, postscale_factor, process_set, *[c for c, _ in pairs])
    return [compression.decompress(o, ctx) for o, (_, ctx) in zip(outs, pairs)]


def grouped_allreduce_(
    tensors, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0, process_set=global_process_set
) -> list:
    return synchronize(
        grouped_allreduce_async_(tensors, average, name, op, prescale_factor, postscale_factor, process_set)
    )


def sparse_allreduce_async(tensor, name, op, process_set=global_process_set):
    """All members: reduce a sparse COO tensor as Horovod does, by allgathering its indices and
    values (``<name>.indices``, ``<name>.values``); returns a callable that waits and yields the
    (uncoalesced) sparse result. Average divides the values by the set size."""
    op = resolve_op(op, None)
    if not tensor.is_sparse:
        raise ValueError("sparse_allreduce_async needs a sparse COO tensor; use allreduce_async for dense ones")
    t = tensor.coalesce() if not tensor.is_coalesced() else tensor
    _, hi = allgather_start(t.indices().transpose(0, 1).contiguous(), f"{name}.indices", process_set)
    _, hv = allgather_start(t.values(), f"{name}.values", process_set)

    def handle():
        values, indices = hv.result(), hi.result()
        if op == Average:
            values = values / len(process_set.ranks)
        return torch.sparse_coo_tensor(indices.transpose(0, 1), values, t.size())

    return handle


# -- allgather -------------------------------------------------------------------------------
def allgather_async(tensor, name=None, process_set=global_process_set) -> int:
    """All members: start concatenating every member's ``tensor`` along dim 0 (first dims may differ)."""
    return _register(allgather_start(tensor, name, process_set))


def allgather(tensor, name=None, process_set=global_process_set) -> torch.Tensor:
    """All members: every member's ``tensor`` concatenated along dim 0, in set-rank order (blocks)."""
    return AllgatherFn.apply(tensor, name, process_set)


def grouped_allgather_async(tensors, name=None, process_set=global_process_set) -> int:
    """All members: allgather each tensor; the handle yields a list."""
    return _register(grouped_allgather_start(list(tensors), name, process_set))


def grouped_allgather(tensors, name=None, process_set=global_process_set) -> list:
    """All members: allgather each tensor (blocks). Differentiable, as Horovod's."""
    return list(GroupedAllgatherFn.apply(name, process_set, *tensors))


# -- broadcast -------------------------------------------------------------------------------
def broadcast_async(tensor, root_rank, name=None, process_set=global_process_set) -> int:
    return _register(broadcast_start(tensor, root_rank, name, process_set, False))


def broadcast_async_(tensor, root_rank, name=None, process_set=global_process_set) -> int:
    return _register(broadcast_start(tensor, root_rank, name, process_set, True))


def broadcast(tensor, root_rank, name=None, process_set=global_process_set) -> torch.Tensor:
    """All members: a copy of global rank ``root_rank``'s ``tensor`` (blocks)."""
    return BroadcastFn.apply(tensor, root_rank, name, process_set)


def broadcast_(tensor, root_rank, name=None, process_set=global_process_set) -> torch.Tensor:
    """All members: overwrite ``tensor`` with ``root_rank``'s (blocks); returns it."""
    return synchronize(broadcast_async_(tensor, root_rank, name, process_set))


# -- alltoall --------------------------------------------------------------------------------
def alltoall_async(tensor, splits=None, name=None, process_set=global_process_set) -> int:
    """All members: start sending ``splits[r]`` first-dim rows of ``tensor`` to set rank r; the
    handle yields ``(output, received_splits)``."""
    return _register(alltoall_start(tensor, splits, name, process_set))


def alltoall(tensor, splits=None, name=None, process_set=global_process_set):
    """All members: the rows every member sent here, in set-rank order (blocks). With ``splits``,
    returns ``(output, received_splits)`` as Horovod does; without, just the output."""
    out, received = AlltoallFn.apply(tensor, splits, name, process_set)
    return out if splits is None else (out, received)


# -- reducescatter ---------------------------------------------------------------------------
def reducescatter_async(
    tensor, name=None, op=Average, process_set=global_process_set, prescale_factor=1.0, postscale_factor=1.0
) -> int:
    """All members: start reducing ``tensor`` and keeping this rank's block of first-dim rows
    (the first ``rows % size`` ranks get one extra row, as in Horovod)."""
    op = resolve_op(op, None)
    return _register(reducescatter_start(tensor, name, op, process_set, prescale_factor, postscale_factor))


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
    op = resolve_op(op, None)
    out = ReducescatterFn.apply(compressed, name, op, process_set, prescale_factor, postscale_factor)
    return compression.decompress(out, ctx)


def grouped_reducescatter_async(
    tensors, name=None, op=Average, process_set=global_process_set, prescale_factor=1.0, postscale_factor=1.0
) -> int:
    op = resolve_op(op, None)
    return _register(
        grouped_reducescatter_start(list(tensors), name, op, process_set, prescale_factor, postscale_factor)
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
    op = resolve_op(op, None)
    outs = GroupedReducescatterFn.apply(
        name, op, process_set, prescale_factor, postscale_factor, *[c for c, _ in pairs]
    )
    return [compression.decompress(o, ctx) for o, (_, ctx) in zip(outs, pairs)]


# -- join and barrier ------------------------------------------------------------------------
def join(device: int = -1) -> int:
    """All ranks, each once it ran out of data: until every rank has joined, this rank answers
    the others' allreduces with zeros (Average still divides by the full size, as in Horovod);
    allgather, broadcast, alltoall and reducescatter raise on the ranks that submit them
    meanwhile. Returns the global rank that joined last (the same on every rank)."""
    return join_start().result()


def barrier(process_set: ProcessSet = global_process_set) -> None:
    """All members: return once every member has entered the barrier."""
    barrier_start(process_set)[1].result()
