"""Learning-rate schedules: who sets each param group's learning rate, step by step.

Four kinds, one :class:`Schedule` interface the trainer drives (every rank, in this order each
optimizer step: ``apply(step)`` before the optimizer steps, ``advance()`` after it):

- ``constant`` / ``cosine`` (built in, linear warmup first): a pure function of the step
  (:func:`lr_at`) that scales each group's base learning rate; nothing to save.
- ``torch``: any ``torch.optim.lr_scheduler`` class by name with its kwargs
  (``schedule.name``/``schedule.kwargs``), stepped once per optimizer step, a ``LinearLR``
  warmup of ``warmup_steps`` composed in front through ``SequentialLR``.
- a user's scheduler (``run.setup(..., scheduler=)``, ``fit(scheduler=)``): stepped the same way.
- ``none``: the trainer leaves the learning rates alone (a scheduler the user steps).

``ReduceLROnPlateau`` (by name in YAML or the user's) is stepped by a metric instead of the step
count (:class:`PlateauSchedule`): at every metrics line that carries ``schedule.monitor`` (default
``eval_loss``; ``loss`` or any metric on the line), with its value, on every rank (the line's values
are reduced over the ranks, so every rank's scheduler takes the same decision). Its counters
(best value, bad lines, cooldown) are checkpointed like any scheduler's state.

A torch scheduler's ``state_dict`` is saved with each checkpoint (``state.json``) and loaded on
resume, with the groups' learning rates set to where it was.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .config.schedule import ScheduleConfig, scheduler_class
from .errors import ConfigError, DisttrainError

SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


def lr_at(
    step: int, peak: float, total_steps: int, kind: str = "cosine", warmup_steps: int = 0, min_lr_ratio: float = 0.1
) -> float:
    """Learning rate for optimizer step ``step`` (0-based)."""
    if warmup_steps and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if kind == "constant":
        return peak
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    floor = peak * min_lr_ratio
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_torch_scheduler(cfg: ScheduleConfig, optimizer: torch.optim.Optimizer):
    """``schedule.name(optimizer, **kwargs)``, after a ``LinearLR`` warmup when ``warmup_steps``."""
    from torch.optim import lr_scheduler

    cls = scheduler_class(cfg.name)
    try:
        main = cls(optimizer, **cfg.kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError([f"schedule: {cls.__name__}(optimizer, **{cfg.kwargs!r}) failed: {exc}"]) from None
    if not cfg.warmup_steps:
        return main
    w = cfg.warmup_steps
    warm = lr_scheduler.LinearLR(optimizer, start_factor=1.0 / w, end_factor=1.0, total_iters=max(w - 1, 1))
    return lr_scheduler.SequentialLR(optimizer, [warm, main], milestones=[w])


class Schedule:
    """The learning rates of the optimizer's groups (``optimizer()``: the strategy's optimizer now, which
    a test may swap with the strategy). ``apply(step)`` before each optimizer step, ``advance()``
    after it; ``lr()`` is the first group's rate of the last step."""

    def __init__(self, optimizer: Callable[[], torch.optim.Optimizer]):
        self._optimizer = optimizer

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._optimizer()

    def apply(self, step: int) -> None:
        pass

    def advance(self) -> None:
        pass

    def observe(self, record: dict | None) -> None:
        """Every rank, after each step's metrics line (``record``; None on a step without one)."""

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict | None:
        return None

    def load_state_dict(self, state: dict | None) -> None:
        pass


class BuiltinSchedule(Schedule):
    """constant/cosine with warmup: group ``i`` gets ``base_i * lr_at(step, 1, ...)``; the base is
    ``optim.lr`` for the built-in optimizer (every group), each group's own rate for a user's."""

    def __init__(self, optimizer, cfg: ScheduleConfig, total_steps: int, peak: float | None):
        super().__init__(optimizer)
        self.cfg, self.total, self.peak = cfg, total_steps, peak
        self.bases = [peak if peak is not None else g["lr"] for g in self.optimizer.param_groups]

    def multiplier(self, step: int) -> float:
        c = self.cfg
        return lr_at(step, 1.0, self.total, c.kind, c.warmup_steps, c.min_lr_ratio)

    def apply(self, step: int) -> None:
        m = self.multiplier(step)
        groups = self.optimizer.param_groups
        for g, base in zip(groups, self.bases if self.peak is None else [self.peak] * len(groups)):
            g["lr"] = base * m


class TorchSchedule(Schedule):
    """A ``torch.optim.lr_scheduler`` object (from YAML or the user), stepped after each optimizer step."""

    def __init__(self, optimizer, scheduler):
        super().__init__(optimizer)
        if scheduler.optimizer is not self.optimizer:
            raise DisttrainError(
                "the scheduler drives another optimizer than the one run.setup() built\n"
                "HINT: pass scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, ...) to run.setup()"
            )
        self.scheduler = scheduler

    def advance(self) -> None:
        self.scheduler.step()

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        if not state:
            return
        self.scheduler.load_state_dict(state)
        for g, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            g["lr"] = lr


class PlateauSchedule(TorchSchedule):
    """``ReduceLROnPlateau``: stepped with ``record[monitor]`` at each metrics line that has it,
    not per optimizer step."""

    def __init__(self, optimizer, scheduler, monitor: str):
        super().__init__(optimizer, scheduler)
        self.monitor = monitor

    def advance(self) -> None:
        pass

    def observe(self, record: dict | None) -> None:
        if record is not None and self.monitor in record:
            self.scheduler.step(float(record[self.monitor]))


def _torch_schedule(optimizer, scheduler, monitor: str) -> TorchSchedule:
    from torch.optim import lr_scheduler

    if isinstance(scheduler, lr_scheduler.ReduceLROnPlateau):
        return PlateauSchedule(optimizer, scheduler, monitor)
    return TorchSchedule(optimizer, scheduler)


def build_schedule(
    cfg,
    optimizer: Callable[[], torch.optim.Optimizer],
    total_steps: int,
    peak: float | None,
    user: SchedulerFactory | Any | None = None,
) -> Schedule:
    """The schedule of ``cfg`` (the ``schedule`` section) over ``optimizer()``; ``user`` (a scheduler,
    or a function of the optimizer returning one) takes precedence. ``peak``: the built-in
    optimizer's ``optim.lr`` (None: each group's own rate is its base)."""
    from torch.optim import lr_scheduler

    if user is not None:
        sched = user if isinstance(user, lr_scheduler.LRScheduler) else user(optimizer())
        if not isinstance(sched, lr_scheduler.LRScheduler):
            raise DisttrainError(
                f"scheduler= gave a {type(sched).__qualname__}, expected a torch.optim.lr_scheduler.LRScheduler"
            )
        return _torch_schedule(optimizer, sched, cfg.monitor)
    if cfg.kind == "none":
        return Schedule(optimizer)
    if cfg.kind == "torch":
        return _torch_schedule(optimizer, build_torch_scheduler(cfg, optimizer()), cfg.monitor)
    return BuiltinSchedule(optimizer, cfg, total_steps, peak)
