"""The differentiable ops: ``hvd.allreduce``, ``allgather``, ``broadcast``, ``alltoall``,
``reducescatter`` and the grouped allreduce, allgather and reducescatter carry gradients back
through the matching collective, as Horovod's autograd functions do (reducescatter's gradient
is the allgathered output gradient, times the set size for Sum and the scale factors).

Called on every member of the set; ``forward`` blocks until the op completed. Backward ops are
unnamed (``<kind>.noname.<n>``), as in Horovod, so ranks must run the same backward ops.
"""

from __future__ import annotations

import torch

from .basics import rank
from .reduce_op import Average, Sum
from .submit import (
    allgather_start,
    allreduce_start,
    alltoall_start,
    broadcast_start,
    grouped_allgather_start,
    grouped_reducescatter_start,
    reducescatter_start,
)


class AllreduceFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, op, name, pre, post, ps):
        ctx.args = (op, pre, post, ps)
        return allreduce_start([tensor.detach()], None, name, op, pre, post, ps, False)[1].result()

    @staticmethod
    def backward(ctx, grad):
        op, pre, post, ps = ctx.args
        return AllreduceFn.apply(grad, op, None, pre, post, ps), None, None, None, None, None


class AllgatherFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, name, ps):
        ctx.dim, ctx.ps = (tensor.shape[0] if tensor.dim() else 1), ps
        return allgather_start(tensor.detach(), name, ps)[1].result()

    @staticmethod
    def backward(ctx, grad):
        ps = ctx.ps
        reduced = AllreduceFn.apply(grad, Average, None, 1.0, 1.0, ps)
        dims = allgather_start(torch.tensor([ctx.dim], dtype=torch.int64), None, ps)[1].result()
        offset = int(dims[: ps.rank()].sum())
        return reduced.narrow(0, offset, ctx.dim), None, None


class BroadcastFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, root_rank, name, ps):
        ctx.root, ctx.ps = root_rank, ps
        return broadcast_start(tensor.detach(), root_rank, name, ps, False)[1].result()

    @staticmethod
    def backward(ctx, grad):
        reduced = AllreduceFn.apply(grad, Average, None, 1.0, 1.0, ctx.ps)
        if rank() != ctx.root:
            reduced = reduced * 0
        return reduced, None, None, None


class AlltoallFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, splits, name, ps):
        out, received = alltoall_start(tensor.detach(), splits, name, ps)[1].result()
        ctx.received, ctx.ps = received, ps
        ctx.mark_non_differentiable(received)
        return out, received

    @staticmethod
    def backward(ctx, grad, _dead):
        back, _ = AlltoallFn.apply(grad.contiguous(), ctx.received, None, ctx.ps)
        return back, None, None, None


class GroupedAllreduceFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, op, name, pre, post, ps, *tensors):
        ctx.args = (op, pre, post, ps)
        detached = [t.detach() for t in tensors]
        return tuple(allreduce_start(detached, None, name, op, pre, post, ps, True)[1].result())

    @staticmethod
    def backward(ctx, *grads):
        op, pre, post, ps = ctx.args
        return (None,) * 5 + tuple(GroupedAllreduceFn.apply(op, None, pre, post, ps, *grads))


class GroupedAllgatherFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, name, ps, *tensors):
        ctx.dims, ctx.ps = [t.shape[0] if t.dim() else 1 for t in tensors], ps
        return tuple(grouped_allgather_start([t.detach() for t in tensors], name, ps)[1].result())

    @staticmethod
    def backward(ctx, *grads):
        ps = ctx.ps
        reduced = GroupedAllreduceFn.apply(Average, None, 1.0, 1.0, ps, *grads)
        mine = [torch.tensor([d], dtype=torch.int64) for d in ctx.dims]
        dims = grouped_allgather_start(mine, None, ps)[1].result()
        r = ps.rank()
        offsets = [int(d[:r].sum()) for d in dims]
        return (None, None) + tuple(g.narrow(0, o, d) for g, o, d in zip(reduced, offsets, ctx.dims))


def _scatter_grad(grad: torch.Tensor, op, pre: float, post: float, ps) -> torch.Tensor:
    if op == Sum:
        grad = grad * ps.size()
    if pre != 1.0:
        grad = grad * pre
    if post != 1.0:
        grad = grad * post
    return grad.contiguous()


class ReducescatterFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, name, op, ps, pre, post):
        ctx.args = (op, pre, post, ps)
        return reducescatter_start(tensor.detach(), name, op, ps, pre, post)[1].result()

    @staticmethod
    def backward(ctx, grad):
        op, pre, post, ps = ctx.args
        return AllgatherFn.apply(_scatter_grad(grad, op, pre, post, ps), None, ps), None, None, None, None, None


class GroupedReducescatterFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, name, op, ps, pre, post, *tensors):
        ctx.args = (op, pre, post, ps)
        detached = [t.detach() for t in tensors]
        return tuple(grouped_reducescatter_start(detached, name, op, ps, pre, post)[1].result())

    @staticmethod
    def backward(ctx, *grads):
        op, pre, post, ps = ctx.args
        scaled = [_scatter_grad(g, op, pre, post, ps) for g in grads]
        return (None,) * 5 + tuple(GroupedAllgatherFn.apply(None, ps, *scaled))
