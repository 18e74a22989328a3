"""The seam between the trainer loop and a parallelism strategy.

Call order per optimizer step, on every rank of the group:
``for each micro-batch: with s.accumulate(last): loss.backward()``, then
``s.finish_gradients()`` (blocks until gradients are reduced), ``s.clip_grad_norm(max)``
(a collective: the global norm), ``s.optimizer_step()``, ``s.zero_grad()``.
Strategies own the optimizer because ZeRO shards it.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterable, Protocol

import torch
import torch.nn as nn

from collectives import Communicator

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]


class Strategy(Protocol):
    model: nn.Module
    optimizer: torch.optim.Optimizer

    def accumulate(self, last: bool) -> ContextManager: ...

    def finish_gradients(self) -> None: ...

    def clip_grad_norm(self, max_norm: float) -> float: ...

    def optimizer_step(self) -> None: ...

    def zero_grad(self) -> None: ...

    def set_lr(self, lr: float) -> None: ...


def build_strategy(cfg, model: nn.Module, make_optimizer: OptimizerFactory, comm: Communicator) -> Strategy:
    """Wrap ``model`` with the strategy named by ``cfg.strategy`` (the ``parallel`` config section)."""
    if cfg.strategy == "ddp":
        from .data_parallel import DataParallel

        return DataParallel(model, make_optimizer, comm, cfg)
    if cfg.strategy in ("zero1", "zero2", "zero3"):
        try:
            from .zero import build_zero
        except ImportError:
            raise NotImplementedError(f"parallel.strategy={cfg.strategy} is not available in this build") from None
        return build_zero(cfg, model, make_optimizer, comm)
    raise ValueError(f"unknown parallel strategy {cfg.strategy!r}")


nullcontext = contextlib.nullcontext
