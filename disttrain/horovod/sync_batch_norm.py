"""``SyncBatchNorm``: batch norm whose statistics cover the whole global batch.

In training, every member computes the mean and variance over all members' samples (two
differentiable SUM allreduces: count and sum, then the sum of squared deviations, which is
steadier than E[x^2] - E[x]^2), so N ranks with b samples each normalise exactly as one process
with the N*b batch, and the gradient flows back through the allreduces. Running statistics use
the unbiased global variance, as torch's BatchNorm does. Eval mode and one-rank jobs fall back
to plain batch norm.
"""

from __future__ import annotations

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from .basics import size
from .ops import allreduce
from .process_sets import global_process_set
from .reduce_op import Sum


class SyncBatchNorm(_BatchNorm):
    """Drop-in for ``torch.nn.BatchNorm{1,2,3}d`` (inputs of dim >= 2). Called on every member of
    ``process_set`` in the same order, each with its own shard of the batch."""

    def __init__(
        self,
        num_features,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
        process_set=global_process_set,
    ):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_set = process_set

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not self.training or size() == 1 or not self.process_set.included():
            return super().forward(input)
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        momentum = (
            (1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum)
            if self.track_running_stats
            else 0.0
        )
        dims = [0] + list(range(2, input.dim()))
        local_count = torch.tensor([input.numel() // input.shape[1]], dtype=input.dtype)
        sums = torch.cat([local_count, input.sum(dims)])
        sums = allreduce(sums, op=Sum, name="sync_batch_norm.sum", process_set=self.process_set)
        count, mean = sums[0], sums[1:] / sums[0]
        shape = [1, -1] + [1] * (input.dim() - 2)
        centered = input - mean.view(shape)
        sq = allreduce((centered * centered).sum(dims), op=Sum, name="sync_batch_norm.sq", process_set=self.process_set)
        var = sq / count
        if self.track_running_stats:
            with torch.no_grad():
                unbiased = var * (count / (count - 1)) if count > 1 else var
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.detach(), alpha=momentum)
        out = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out
