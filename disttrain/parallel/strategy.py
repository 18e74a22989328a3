"""The contracts between the trainer, the strategies and checkpoints (no implementations here:
``builder.build_strategy`` chooses one).

Call order per optimizer step, on every rank of the group:
``for each micro-batch: with s.accumulate(last): loss.backward()``, then
``s.finish_gradients()`` (blocks until gradients are reduced), ``s.clip_grad_norm(max)``
(a collective: the global norm), ``s.optimizer_step()``, ``s.zero_grad()``.
Strategies own the optimizer because ZeRO shards it; they build it from an
:class:`OptimizerSpec`.

Checkpoints see a strategy's state as :class:`Shard` pieces of *logical* tensors (named
by the single-process model: ``model.<param>``, ``model.<buffer>``, ``optim.<param>.<state>``),
each with its global shape and the box this rank holds. Saving asks ``state_shards()``;
loading calls ``load_state_shards(read)`` and the strategy asks for exactly the boxes its
own layout needs, so a checkpoint written by one layout/world size loads into another.

A strategy that schedules micro-batches itself (pipeline parallel) says so with
``schedules_micro_batches = True`` and implements :class:`MicroBatchScheduler`; the trainer
then calls its ``split_micro_batches``, ``forward_backward_micro`` and ``last_stage_broadcast``
instead of its own loop (narrow with :func:`schedules_micro_batches`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager as ContextManager
from typing import ClassVar, Protocol, TypeGuard

import torch
import torch.nn as nn


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

    def options(self, name: str, param: torch.nn.Parameter) -> GroupOptions:
        """``group_of`` as a canonical (sorted) key."""
        return tuple(sorted(self.group_of(name, param)))

    def groups(self, named: Iterable[tuple[str, torch.nn.Parameter]]) -> list[dict]:
        """Torch param groups for ``named`` parameters, in first-seen order of their option sets."""
        by_options: dict[GroupOptions, list[torch.nn.Parameter]] = {}
        for name, p in named:
            by_options.setdefault(self.options(name, p), []).append(p)
        return [{"params": ps, **dict(opts)} for opts, ps in by_options.items()]

    def build_for(self, named: Iterable[tuple[str, torch.nn.Parameter]]) -> torch.optim.Optimizer:
        return self.build(self.groups(named))

    def factory_for(self, model: nn.Module) -> OptimizerFactory:
        """An old-style ``make_optimizer(params)`` that names each parameter by its place in ``model``
        at call time (for strategies that take a factory)."""

        def make(params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
            name_of = {p: n for n, p in model.named_parameters()}
            return self.build_for((name_of[p], p) for p in params)

        return make


class Strategy(Protocol):
    """What the trainer and the checkpointer use. Every method is called on every rank of the group."""

    model: nn.Module  # called like the user's model
    optimizer: torch.optim.Optimizer
    dp_rank: int  # this rank's data-parallel replica (which samples it reads)
    dp_size: int  # data-parallel replicas (tp/pp peers of one replica read the same samples)
    schedules_micro_batches: ClassVar[bool]  # True: the trainer drives it through MicroBatchScheduler

    def accumulate(self, last: bool) -> ContextManager: ...

    def finish_gradients(self) -> None: ...

    def clip_grad_norm(self, max_norm: float) -> float: ...

    def grad_tensors(self) -> list[torch.Tensor]:
        """The gradient storage this rank steps with (flat buffers or shards), for loss scaling."""
        ...

    def optimizer_step(self) -> None: ...

    def zero_grad(self) -> None: ...

    def set_lr(self, lr: float) -> None: ...

    def memory_bytes(self) -> dict[str, int]:
        """This rank's bytes of parameters, gradients and optimizer state, now."""
        ...

    def state_shards(self) -> list[Shard]:
        """Model (parameters and persistent buffers) and optimizer state as shards of logical tensors.
        Local; no communication."""
        ...

    def load_state_shards(self, read: ShardReader) -> None:
        """Fill model and optimizer state from a checkpoint through ``read``. Local."""
        ...


class MicroBatchScheduler(Strategy, Protocol):
    """A strategy that runs a step's micro-batches itself (pipeline parallel). Per optimizer step the
    trainer (``parallel.pipeline.step.run_step_fn``), on every rank of the world, calls in this order:
    ``split_micro_batches``, ``forward_backward_micro``, ``last_stage_broadcast``; then the usual
    ``finish_gradients`` ... ``zero_grad`` of :class:`Strategy`."""

    def split_micro_batches(self, batches: list) -> list:
        """This replica's batches (any nesting of tensors) re-cut into the schedule's micro-batches.
        Local; no communication."""
        ...

    def forward_backward_micro(self, micro_batches: list, loss_fn: Callable, loss_scale: float = 1.0) -> float:
        """Forward and backward exactly these ``(input, target)`` micro-batches on the strategy's own
        schedule; gradients are of ``loss * loss_scale``. Returns this rank's unscaled loss sum.
        Collective over the pipeline; blocks until this rank's part of the schedule is done."""
        ...

    def last_stage_broadcast(self, values: list[float]) -> list[float]:
        """The last stage's ``values`` (the loss sum and count it computed) on every stage.
        Collective over the pp group; blocks."""
        ...


def schedules_micro_batches(strategy: Strategy) -> TypeGuard[MicroBatchScheduler]:
    """True when ``strategy`` runs the micro-batches itself (drive it through :class:`MicroBatchScheduler`)."""
    return strategy.schedules_micro_batches
