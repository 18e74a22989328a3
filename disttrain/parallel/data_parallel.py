"""Data parallel: every rank holds the whole model and optimizer; gradients are summed across ranks.

Gradients are flattened into one buffer and reduced with one allreduce after the last
micro-batch (losses are already divided by the global sample count, so a SUM gives the
global-batch gradient). Parameters are broadcast from rank 0 at start.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from collectives import Communicator, ReduceOp


class DataParallel:
    def __init__(self, model: nn.Module, make_optimizer, comm: Communicator, cfg):
        self.model, self.comm, self.cfg = model, comm, cfg
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params)
        self.broadcast_parameters()

    def broadcast_parameters(self) -> None:
        """Make every rank start from rank 0's weights (one flat broadcast). Collective."""
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])
            self.comm.broadcast(flat, src=0)
            torch.nn.utils.vector_to_parameters(flat, list(self.model.parameters()))

    def accumulate(self, last: bool):
        return contextlib.nullcontext()

    def finish_gradients(self) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.comm.allreduce(flat, ReduceOp.SUM)
        offset = 0
        for p in self.params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n

    def clip_grad_norm(self, max_norm: float) -> float:
        """Gradients are whole on every rank after the allreduce: the local norm is the global norm."""
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm if max_norm > 0 else float("inf"))
        return float(norm)

    def optimizer_step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr
