"""BatchNorm whose batch statistics are those of the global batch (``parallel.sync_batchnorm``).

torch's ``nn.SyncBatchNorm`` needs a torch.distributed process group (and, for its kernels,
CUDA); ours reduces over any :class:`collectives.Communicator`, on CPU or GPU. In training mode
each rank sums its per-channel ``x`` and ``x**2`` and its element count, one allreduce makes
them global, and every rank normalises with the global mean and variance; the backward of that
allreduce is an allreduce of the gradients of the sums (each rank's loss depends on every rank's
inputs through them). So N ranks in train mode compute what one process computes on the union of
their micro-batches, running statistics included (identical on every rank, so nothing drifts).
Evaluation mode uses the running statistics: no communication.

Every rank must run every BatchNorm forward in training (a rank without samples in a micro-batch
would leave its peers waiting): keep ``train.batch_size >= world size x train.grad_accum``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from collectives import Communicator, ReduceOp


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: torch.Tensor, comm: Communicator) -> torch.Tensor:
        ctx.comm = comm
        out = t.detach().clone()
        comm.allreduce(out, ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        g = grad.contiguous().clone()
        ctx.comm.allreduce(g, ReduceOp.SUM)
        return g, None


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A drop-in for BatchNorm1d/2d/3d with the same parameters, buffers and state-dict names."""

    def __init__(self, num_features: int, comm: Communicator, **kwargs):
        super().__init__(num_features, **kwargs)
        self._comm = [comm]  # a list: not a submodule, not state

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        batch_stats = self.training or not self.track_running_stats
        if not batch_stats:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        comm = self._comm[0]
        dims = [0, *range(2, x.dim())]
        xf = x.float()
        count = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float32, device=x.device)
        local = torch.cat([xf.sum(dims), (xf * xf).sum(dims), count])
        tot = _AllReduceSum.apply(local, comm) if comm.world_size > 1 else local
        c = self.num_features
        n = tot[2 * c]
        mean = tot[:c] / n
        var = (tot[c : 2 * c] / n - mean * mean).clamp_min(0.0)
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                unbiased = var.detach() * (n / (n - 1)) if float(n) > 1 else var.detach()
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def apply_sync_batchnorm(model: nn.Module, comm: Communicator) -> int:
    """Replace every BatchNorm1d/2d/3d in ``model`` by :class:`SyncBatchNorm` over ``comm``, keeping its
    parameter and buffer objects (names and identities unchanged). Returns how many were replaced. Local."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, SyncBatchNorm):
                new = SyncBatchNorm(
                    child.num_features,
                    comm,
                    eps=child.eps,
                    momentum=child.momentum,
                    affine=child.affine,
                    track_running_stats=child.track_running_stats,
                )
                new.weight, new.bias = child.weight, child.bias
                new.running_mean, new.running_var = child.running_mean, child.running_var
                new.num_batches_tracked = child.num_batches_tracked
                new.train(child.training)
                setattr(parent, name, new)
                replaced += 1
    return replaced
