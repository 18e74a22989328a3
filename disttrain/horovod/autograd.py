"""The differentiable ops: ``hvd.allreduce``, ``allgather``, ``broadcast`` and ``alltoall`` carry
gradients back through the matching collective, as Horovod's autograd functions do.

Called on every member of the set; ``forward`` blocks until the op completed. Backward ops are
unnamed (``<kind>.noname.<n>``), as in Horovod, so ranks must run the same backward ops.
"""

from __future__ import annotations

import torch

from .basics import rank
from .reduce_op import Average
from .submit import allgather_start, allreduce_start, alltoall_start, broadcast_start


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
