"""Trackers: a run's metrics in the tools users already read (TensorBoard, W&B, MLflow, CSV).

``log.trackers: [tensorboard, wandb, mlflow, csv]`` adds them beside ``metrics.jsonl`` (which
always exists). One module per tool, each behind :class:`Tracker` and imported only when named;
the libraries come with the ``trackers`` extra (``pip install 'disttrain[trackers]'``), and
:func:`missing` lets the config refuse a tracker that is not installed before any rank starts.
Rank 0 writes; :class:`TrackerCallback` feeds them from the trainer's hooks.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import subprocess
from typing import Protocol

from ...errors import DisttrainError
from ..callbacks import Callback

log = logging.getLogger(__name__)

EXTRA_HINT = "HINT: pip install 'disttrain[trackers]'"


class Tracker(Protocol):
    """One tool's writer, on rank 0. Call order: ``log_run`` once, ``log_metrics`` per metrics
    line, ``close`` once (``failed`` when the run raised)."""

    def log_run(self, config: dict, layout: dict, git: str | None) -> None: ...

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self, failed: bool = False) -> None: ...


# name -> (module under disttrain.observe.trackers, the class, the packages it imports)
REGISTRY: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "tensorboard": ("tensorboard", "TensorBoardTracker", ("tensorboard",)),
    "wandb": ("wandb", "WandbTracker", ("wandb",)),
    "mlflow": ("mlflow", "MlflowTracker", ("mlflow", "sqlalchemy")),
    "csv": ("csv", "CsvTracker", ()),
}


def missing(name: str) -> str | None:
    """Why tracker ``name`` cannot be used here (unknown, or its library is not installed), or None."""
    if name not in REGISTRY:
        return f"unknown tracker {name!r}; known: {', '.join(REGISTRY)}"
    absent = [pkg for pkg in REGISTRY[name][2] if importlib.util.find_spec(pkg) is None]
    if absent:
        return f"tracker {name!r} needs {', '.join(absent)}, which is not installed\n{EXTRA_HINT}"
    return None


def build_tracker(name: str, log_cfg, run_dir: str, run_name: str) -> Tracker:
    why = missing(name)
    if why:
        raise DisttrainError(why)
    module, cls, _ = REGISTRY[name]
    mod = importlib.import_module(f"{__name__}.{module}")
    return getattr(mod, cls)(log_cfg, run_dir, run_name)


def flatten(metrics: dict) -> dict[str, float]:
    """Numbers as they are, lists of numbers as ``name/0``, ``name/1``...; anything else left out."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or k == "step":
            continue
        if isinstance(v, (int, float)):
            out[k] = float(v)
        elif isinstance(v, (list, tuple)):
            out.update({f"{k}/{i}": float(x) for i, x in enumerate(v) if isinstance(x, (int, float))})
    return out


def git_revision(cwd: str | None = None) -> str | None:
    """``git rev-parse HEAD`` of the working directory (with ``-dirty`` when it has changes), or None."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "") if head else None


def layout_of(trainer) -> dict:
    """The job's shape, for trackers: world, nodes, backend, strategy and mesh degrees."""
    env, comm, par = trainer.comm.env, trainer.comm, trainer.cfg.parallel
    return {
        "world_size": comm.world_size,
        "local_world_size": env.local_world_size,
        "nnodes": max(1, comm.world_size // max(env.local_world_size, 1)),
        "backend": comm.backend.name,
        "device": trainer.device,
        "strategy": par.strategy,
        "dp": trainer.dp_size,
        "tp": par.mesh.tp,
        "pp": par.mesh.pp,
        "rank0_host": env.host,
    }


class TrackerCallback(Callback):
    """Rank 0: the run's config, layout and git revision once, then every metrics line and the final
    evaluation, to every tracker of ``log.trackers``."""

    def __init__(self, names: list[str], log_cfg, run_dir: str, run_name: str):
        self.names, self.log_cfg, self.run_dir, self.run_name = list(names), log_cfg, run_dir, run_name
        self.trackers: list[Tracker] = []

    def on_train_start(self, trainer) -> None:
        if trainer.comm.rank != 0 or self.trackers or trainer.step >= trainer.cfg.train.steps:
            return
        os.makedirs(self.run_dir, exist_ok=True)
        self.trackers = [build_tracker(n, self.log_cfg, self.run_dir, self.run_name) for n in self.names]
        layout = layout_of(trainer)
        config = trainer.cfg.model_dump(mode="json")
        git = git_revision()
        for t in self.trackers:
            t.log_run(config, layout, git)

    def on_step_end(self, trainer) -> None:
        rec = trainer.last_record
        if rec is not None and self.trackers:
            flat = flatten(rec)
            for t in self.trackers:
                t.log_metrics(int(rec["step"]), flat)

    def on_train_end(self, trainer, summary: dict) -> None:
        if not self.trackers:
            return
        final = {k.removeprefix("final_"): v for k, v in summary.items() if k.startswith("final_eval_")}
        last = trainer.history[-1] if trainer.history else {}
        if final and not (last.get("step") == summary["steps"] and "eval_loss" in last):  # not on the last line
            for t in self.trackers:
                t.log_metrics(int(summary["steps"]), flatten(final))
        self._close(False)

    def on_exception(self, trainer, exc: BaseException) -> None:
        self._close(True)

    def _close(self, failed: bool) -> None:
        trackers, self.trackers = self.trackers, []
        for t in trackers:
            try:
                t.close(failed)
            except Exception as exc:  # one tool failing to flush must not hide the others
                log.warning("closing tracker %s failed: %s", type(t).__name__, exc)
