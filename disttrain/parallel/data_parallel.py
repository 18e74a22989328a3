"""Data parallel: every rank holds the whole model and optimizer; gradients are summed across ranks.

Gradients live in flat buckets (``buckets.GradBuckets``) whose allreduces are launched from
autograd hooks while backward is still running, and waited for in ``finish_gradients``.
Losses are already divided by the global sample count, so a SUM gives the global-batch
gradient. Parameters and buffers are broadcast from rank 0 at start, and buffers again after
each step (``parallel.broadcast_buffers``, as torch DDP). Micro-batches before the last one only
accumulate (no communication). Tied parameters are one tensor: reduced and saved once.

Call order (every rank): ``with dp.accumulate(last): loss.backward()`` per micro-batch,
then ``finish_gradients()`` (blocks), ``clip_grad_norm()``, ``optimizer_step()``, ``zero_grad()``.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn as nn

from collectives import Communicator

from ..config.parallel import ParallelConfig
from .buckets import GradBuckets, clip_
from .buffers import broadcast_buffers, broadcast_parameters, buffer_shards, full_box, load_buffers
from .optim_state import materialize_state, optimizer_bytes, state_tensors, storage_bytes, track_state_bytes
from .strategy import OptimizerSpec, Shard, ShardReader

log = logging.getLogger(__name__)


class DataParallel:
    schedules_micro_batches = False

    def __init__(self, model: nn.Module, optim: OptimizerSpec, comm: Communicator, cfg: ParallelConfig):
        self.model, self.comm, self.cfg = model, comm, cfg
        self.dp_rank, self.dp_size = comm.rank, comm.world_size
        self.sync_buffers = cfg.broadcast_buffers and not cfg.sync_batchnorm and comm.world_size > 1
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named]
        self.broadcast_parameters()
        # One process has nothing to reduce: plain autograd grads (no bucket views, no zeroing memset).
        self.buckets = GradBuckets(self.params, comm, cfg) if comm.world_size > 1 else None
        self.optimizer = optim.build_for(self.named)
        self.peak_state_bytes = 0  # params+grads+optimizer state, bytes, after the first steps
        self._steps = 0

    def broadcast_parameters(self) -> None:
        """Make every rank start from rank 0's parameters and buffers. Collective."""
        broadcast_parameters(self.model, self.comm)

    def accumulate(self, last: bool):
        """Context for one micro-batch's backward; only the ``last`` one communicates."""
        return self.buckets.accumulate(last) if self.buckets else contextlib.nullcontext()

    def finish_gradients(self) -> None:
        """Launch the buckets that did not fill and wait for every allreduce. Collective, blocks."""
        if self.buckets:
            self.buckets.finish()
        if self.sync_buffers:
            broadcast_buffers(self.model, self.comm)

    def clip_grad_norm(self, max_norm: float) -> float:
        """Gradients are whole on every rank after the allreduce: the local norm is the global norm."""
        return clip_(self.grad_tensors(), max_norm)

    def grad_tensors(self) -> list[torch.Tensor]:
        """The gradient storage this rank steps with (for loss-scaling checks): the bucket buffers."""
        if self.buckets is None:
            return [p.grad.view(-1) for p in self.params if p.grad is not None]
        return [b.buf for b in self.buckets.buckets]

    def optimizer_step(self) -> None:
        self.optimizer.step()
        self._steps += 1
        self.peak_state_bytes = track_state_bytes(self, self._steps, self.peak_state_bytes)

    def zero_grad(self) -> None:
        if self.buckets:
            self.buckets.zero()
        else:
            self.optimizer.zero_grad(set_to_none=True)

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def memory_bytes(self) -> dict[str, int]:
        """This rank's bytes of parameters, gradients (bucket buffers) and optimizer state."""
        return {
            "params": storage_bytes(self.params),
            "grads": self.buckets.nbytes() if self.buckets else storage_bytes(p.grad for p in self.params),
            "optim": optimizer_bytes(self.optimizer),
        }

    # -- checkpoints (see strategy.Shard) --------------------------------------------------
    def state_shards(self) -> list[Shard]:
        """Every tensor whole and replicated on all ranks. Local."""
        out = [
            Shard(f"model.{n}", p.detach(), tuple(p.shape), full_box(p.shape), replicated=True) for n, p in self.named
        ]
        out += buffer_shards(self.model)
        for n, p in self.named:
            for k, v in state_tensors(self.optimizer, p).items():
                out.append(Shard(f"optim.{n}.{k}", v, tuple(v.shape), full_box(v.shape), replicated=True))
        return out

    def load_state_shards(self, read: ShardReader) -> None:
        """Read every tensor whole. Local."""
        with torch.no_grad():
            for n, p in self.named:
                p.copy_(read(f"model.{n}", tuple(p.shape), full_box(p.shape), False))
            load_buffers(self.model, read)
            materialize_state(self.optimizer)
            for n, p in self.named:
                for k, v in state_tensors(self.optimizer, p).items():
                    v.copy_(read(f"optim.{n}.{k}", tuple(v.shape), full_box(v.shape), False))
