"""The seam between the trainer loop and a parallelism strategy.

Call order per optimizer step, on every rank of the group:
``for each micro-batch: with s.accumulate(last): loss.backward()``, then
``s.finish_gradients()`` (blocks until gradients are reduced), ``s.clip_grad_norm(max)``
(a collective: the global norm), ``s.optimizer_step()``, ``s.zero_grad()``.
Strategies own the optimizer because ZeRO shards it.

Checkpoints see a strategy's state as :class:`Shard` pieces of *logical* tensors (named
by the single-process model: ``model.<param>``, ``optim.<param>.<state>``), each with
its global shape and the box this rank holds. Saving asks ``state_shards()``; loading
calls ``load_state_shards(read)`` and the strategy asks for exactly the boxes its own
layout needs, so a checkpoint written by one layout/world size loads into another.

A strategy that schedules micro-batches itself (pipeline parallel) implements
``forward_backward(micro_batches, loss_fn) -> float``; the trainer then calls it
instead of its own loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager as ContextManager
from typing import Protocol

import torch
import torch.nn as nn

from collectives import Communicator


@dataclasses.dataclass(frozen=True)
class Shard:
    """This rank's piece of one logical tensor of the training state."""

    name: str  # "model.blocks.0.attn.qkv.weight", "optim.blocks.0.attn.qkv.weight.exp_avg", ...
    tensor: torch.Tensor  # the local piece, shaped like the box
    global_shape: tuple[int, ...]
    box: tuple[tuple[int, int], ...]  # [start, stop) per dim of global_shape, or of (numel,) if flat
    flat: bool = False  # the box indexes the logical tensor flattened to 1-D (ZeRO's flat shards)
    replicated: bool = False  # other ranks hold identical bytes: a writer may save it once


# read(name, global_shape, box, flat) -> tensor shaped like the box (raises if the checkpoint lacks it)
ShardReader = Callable[[str, tuple, tuple, bool], torch.Tensor]

OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]

# Per-group options for one parameter, as a sorted tuple of (option, value) pairs: () for the optimizer's
# defaults, (("weight_decay", 0.0),) for a bias or norm weight under the usual no-decay rule.
GroupOptions = tuple[tuple[str, object], ...]


def _no_groups(name: str, param: torch.nn.Parameter) -> GroupOptions:
    return ()


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """How a strategy builds its optimizer: the contract between whoever configures the optimizer (the
    trainer from ``optim:``, or the user's own factory through the Python API) and the strategies.

    ``build`` takes torch param groups (``[{"params": [...], **options}, ...]``) and returns the optimizer.
    ``group_of(name, param)`` says which options a parameter gets; ``name`` is its name in the
    single-process model. A strategy that keeps the real parameters calls ``build_for(named_params)``;
    one that flattens parameters (ZeRO) must keep parameters with different options in different flat
    buffers, grouping with ``group_of``, and call ``build`` with one group per distinct option set.
    """

    build: Callable[[list[dict]], torch.optim.Optimizer]
    group_of: Callable[[str, torch.nn.Parameter], GroupOptions] = _no_groups

    def groups(self, named: Iterable[tuple[str, torch.nn.Parameter]]) -> list[dict]:
        """Torch param groups for ``named`` parameters, in first-seen order of their option sets."""
        by_options: dict[GroupOptions, list[torch.nn.Parameter]] = {}
        for name, p in named:
            by_options.setdefault(tuple(sorted(self.group_of(name, p))), []).append(p)
        return [{"params": ps, **dict(opts)} for opts, ps in by_options.items()]

    def build_for(self, named: Iterable[tuple[str, torch.nn.Parameter]]) -> torch.optim.Optimizer:
        return self.build(self.groups(named))


class Strategy(Protocol):
    model: nn.Module
    optimizer: torch.optim.Optimizer

    def accumulate(self, last: bool) -> ContextManager: ...

    def finish_gradients(self) -> None: ...

    def clip_grad_norm(self, max_norm: float) -> float: ...

    def optimizer_step(self) -> None: ...

    def zero_grad(self) -> None: ...

    def set_lr(self, lr: float) -> None: ...

    def state_shards(self) -> list[Shard]:
        """Model and optimizer state as shards of logical tensors. Local; no communication."""
        ...

    def load_state_shards(self, read: ShardReader) -> None:
        """Fill model and optimizer state from a checkpoint through ``read``. Local."""
        ...


def broadcast_parameters(model: nn.Module, comm: Communicator) -> None:
    """Make every rank start from rank 0's weights (one flat broadcast). Collective over ``comm``."""
    if comm.world_size == 1:
        return
    with torch.no_grad():
        params = list(model.parameters())
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        comm.broadcast(flat, src=0)
        torch.nn.utils.vector_to_parameters(flat, params)


def build_strategy(cfg, model: nn.Module, make_optimizer: OptimizerFactory, comm: Communicator) -> Strategy:
    """Wrap ``model`` with the strategy named by ``cfg.strategy`` (the ``parallel`` config section)."""
    mesh = getattr(cfg, "mesh", None)
    if mesh is not None and (mesh.tp > 1 or mesh.pp > 1):  # model parallel (composes ddp/zero1 over dp)
        from .model_parallel import build_model_parallel

        return build_model_parallel(cfg, model, make_optimizer, comm)
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
