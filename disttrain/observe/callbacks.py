"""Callbacks: the trainer's hooks, one class with no-op methods, called in a documented order.

Every rank calls every hook at the same step, in list order (``Trainer.callbacks``), so a hook
may run collectives (the checkpointer does). The order within one run:

    on_train_start                        once, before the first step (after a resume: at its step)
    per optimizer step:
        before_optimizer_step             gradients reduced and clipped; the optimizer steps next
        on_eval_end(metrics)              when this step evaluates (train.eval_every)
        on_step_end                       ``trainer.last_record`` is the metrics line or None
    on_checkpoint(step, path)             after each save is issued (path: its step directory)
    on_eval_end(metrics)                  the final evaluation
    on_train_end(summary)                 once; ``summary`` may be extended
    on_exception(exc)                     instead of the rest, when the built-in loop raises

The built-in ones: the preemption stop (``disttrain.slurm.preemption``), the checkpointer, the
progress line and the trackers; from YAML ``callbacks: [{target, kwargs}]`` or ``fit(callbacks=)``
the user's own, and :class:`EarlyStopping` and :class:`BestCheckpoint` (names ``early_stopping``
and ``best_checkpoint``).
"""

from __future__ import annotations

import json
import logging
import math
import os

from ..errors import DisttrainError

log = logging.getLogger(__name__)


class Callback:
    """Subclass and override the hooks you need; ``trainer`` is the rank's :class:`Trainer`."""

    def on_train_start(self, trainer) -> None:
        """Every rank, once, before the first step of this process (a resumed run: after loading)."""

    def before_optimizer_step(self, trainer) -> None:
        """Every rank, each step: gradients are final (reduced, scaled, clipped); the optimizer is next."""

    def on_step_end(self, trainer) -> None:
        """Every rank, after each optimizer step and its metrics line (``trainer.last_record`` or None)."""

    def on_eval_end(self, trainer, metrics: dict) -> None:
        """Every rank, after each evaluation; ``metrics`` are reduced over the ranks (same everywhere)."""

    def on_checkpoint(self, trainer, step: int, path: str) -> None:
        """Every rank, after a checkpoint of ``step`` is issued (async ones commit later) at ``path``."""

    def on_exception(self, trainer, exc: BaseException) -> None:
        """The rank whose loop raised ``exc``, before it propagates (no collectives here)."""

    def on_train_end(self, trainer, summary: dict) -> None:
        """Every rank, once, after the final evaluation; may add keys to ``summary``."""


def check_callbacks(callbacks: list) -> list[Callback]:
    """``callbacks`` as a list, each checked to be a :class:`Callback`."""
    for cb in callbacks:
        if not isinstance(cb, Callback):
            raise DisttrainError(
                f"callback {cb!r} is a {type(cb).__qualname__}, not a disttrain Callback\n"
                "HINT: subclass disttrain.Callback and override the hooks you need"
            )
    return list(callbacks)


def _better(mode: str, value: float, best: float | None, min_delta: float) -> bool:
    if best is None:
        return not math.isnan(value)
    return value < best - min_delta if mode == "min" else value > best + min_delta


class EarlyStopping(Callback):
    """Stop when ``monitor`` (an evaluation metric such as ``eval_loss``, or any key of the metrics
    line) has not improved by ``min_delta`` for ``patience`` checks. Every rank sees the same
    reduced values, so every rank stops after the same step (and the checkpointer saves it)."""

    def __init__(self, monitor: str = "eval_loss", mode: str = "min", patience: int = 3, min_delta: float = 0.0):
        if mode not in ("min", "max"):
            raise DisttrainError(f"EarlyStopping: mode {mode!r}, expected 'min' or 'max'")
        self.monitor, self.mode, self.patience, self.min_delta = monitor, mode, patience, min_delta
        self.best: float | None = None
        self.bad = 0
        self.stopped_at: int | None = None

    def _check(self, trainer, metrics: dict) -> None:
        if self.monitor not in metrics or trainer.stop_requested:
            return
        value = float(metrics[self.monitor])
        if _better(self.mode, value, self.best, self.min_delta):
            self.best, self.bad = value, 0
            return
        self.bad += 1
        if self.bad >= self.patience and trainer.step < trainer.cfg.train.steps:
            trainer.stop_requested = True
            self.stopped_at = trainer.step
            if trainer.comm.rank == 0:
                print(
                    f"early stopping: {self.monitor} has not improved on {self.best:.6g} for {self.bad} "
                    f"checks; stopping after step {trainer.step}",
                    flush=True,
                )

    def on_eval_end(self, trainer, metrics: dict) -> None:
        self._check(trainer, metrics)

    def on_step_end(self, trainer) -> None:
        rec = trainer.last_record
        if rec is not None and not self.monitor.startswith("eval_"):
            self._check(trainer, rec)

    def on_train_end(self, trainer, summary: dict) -> None:
        summary["early_stopped_at"] = self.stopped_at


class BestCheckpoint(Callback):
    """Keep the checkpoint with the best ``monitor`` (an evaluation metric): on each improvement it
    saves that step (synchronously), keeps it out of pruning and records it in
    ``checkpoints/best.json`` (``{"step", "path", "monitor", "value"}``). Needs checkpoints enabled
    and a run directory; the best value survives a resume."""

    def __init__(self, monitor: str = "eval_loss", mode: str = "min", min_delta: float = 0.0):
        if mode not in ("min", "max"):
            raise DisttrainError(f"BestCheckpoint: mode {mode!r}, expected 'min' or 'max'")
        self.monitor, self.mode, self.min_delta = monitor, mode, min_delta
        self.best: float | None = None
        self.best_step: int | None = None

    def _checkpointer(self, trainer):
        from ..checkpoint import Checkpointer

        found = [cb for cb in trainer.callbacks if isinstance(cb, Checkpointer)]
        return found[0] if found and found[0].active else None

    def on_train_start(self, trainer) -> None:
        ckpt = self._checkpointer(trainer)
        if ckpt is None:
            if trainer.comm.rank == 0:
                log.warning("best_checkpoint: checkpoints are off (or no run directory); nothing is kept")
            return
        saved = None
        if trainer.comm.rank == 0:
            try:
                with open(os.path.join(ckpt.dir, "best.json")) as f:
                    saved = json.load(f)
            except (OSError, ValueError):
                saved = None
        saved = ckpt.broadcast_json(saved)
        if isinstance(saved, dict) and saved.get("monitor") == self.monitor:
            self.best, self.best_step = float(saved["value"]), int(saved["step"])
            ckpt.protect(self.best_step)

    def on_eval_end(self, trainer, metrics: dict) -> None:
        ckpt = self._checkpointer(trainer)
        if ckpt is None or self.monitor not in metrics:
            return
        value = float(metrics[self.monitor])
        if not _better(self.mode, value, self.best, self.min_delta):
            return
        if ckpt.last_saved != trainer.step:
            ckpt.save(trainer, sync=True)
        else:
            ckpt.wait()
        if self.best_step is not None and self.best_step != trainer.step:
            ckpt.unprotect(self.best_step)
        self.best, self.best_step = value, trainer.step
        ckpt.protect(trainer.step)
        if trainer.comm.rank == 0:
            record = {"step": trainer.step, "path": ckpt.step_path(trainer.step), "monitor": self.monitor}
            record["value"] = value
            tmp = os.path.join(ckpt.dir, "best.json.tmp")
            with open(tmp, "w") as f:
                json.dump(record, f)
            os.replace(tmp, os.path.join(ckpt.dir, "best.json"))

    def on_train_end(self, trainer, summary: dict) -> None:
        summary["best_checkpoint"] = (
            None if self.best_step is None else {"step": self.best_step, self.monitor: self.best}
        )


BUILTIN = {"early_stopping": EarlyStopping, "best_checkpoint": BestCheckpoint}


def build_callbacks(entries, import_path: list[str]) -> list[Callback]:
    """The YAML ``callbacks`` list: a built-in name or ``pkg.mod:Class`` called with ``kwargs``."""
    from ..targets import UserCodeError, import_target

    out = []
    for i, entry in enumerate(entries):
        factory = BUILTIN.get(entry.target) or import_target(entry.target, import_path)
        try:
            cb = factory(**entry.kwargs)
        except TypeError as exc:
            raise UserCodeError(f"callbacks[{i}]: {entry.target}(**{entry.kwargs!r}) failed: {exc}") from exc
        if not isinstance(cb, Callback):
            raise UserCodeError(
                f"callbacks[{i}]: {entry.target} returned a {type(cb).__qualname__}, not a disttrain Callback\n"
                "HINT: subclass disttrain.Callback"
            )
        out.append(cb)
    return out
