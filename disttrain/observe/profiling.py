"""Profiles: ``profile: {steps: [a, b], ranks: [0]}`` records steps a..b (1-based, inclusive) of the
listed ranks with ``torch.profiler`` and writes ``RUN_DIR/profiles/rank<R>.trace.json`` (Chrome /
Perfetto format: chrome://tracing, ui.perfetto.dev), every collective a named range
(``allreduce#12 (world)``, from the flight recorder). A callback: it starts after step a-1 ends
(or at the start) and stops after step b; ranks not listed do nothing.

``profiles/`` is a door (a shared-group run directory lets the group create in it; a rank on
another host may find the path made by someone else): each listed rank makes it private at the
start (:func:`disttrain.rundir.private_dir`: created 0700, or 0750 in a shared-group run; an
existing one must be a directory of ours, never a symlink), and the trace is written through
that directory's descriptor into a fresh temporary renamed over the name, so nothing planted
is followed. A refused directory fails the run at its start, naming the rank and host.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from collectives import flight_recorder

from .. import rundir
from ..errors import DisttrainError
from .callbacks import Callback

if TYPE_CHECKING:
    from ..config.log import ProfileConfig


class Profiler(Callback):
    def __init__(self, cfg: ProfileConfig, run_dir: str):
        self.first, self.last = cfg.steps
        self.ranks, self.record_shapes = set(cfg.ranks), cfg.record_shapes
        self.run_dir, self.dir = run_dir, os.path.join(run_dir, "profiles")
        self.prof: torch.profiler.profile | None = None
        self.path: str | None = None
        self._fd: int | None = None  # profiles/, opened private (listed ranks)

    def _open_dir(self, trainer) -> None:
        try:
            rundir.prepare(self.run_dir, rundir.shared_group())  # a rank on another host may create it
            self._fd = rundir.private_dir(self.dir)
        except (rundir.RunDirError, OSError) as exc:
            raise DisttrainError(f"rank {trainer.comm.env.where}: profile: {exc}") from None

    def _start(self, trainer) -> None:
        if trainer.comm.rank not in self.ranks or self.prof is not None:
            return
        if self._fd is None:
            self._open_dir(trainer)
        acts = [torch.profiler.ProfilerActivity.CPU]
        if str(trainer.device).startswith("cuda"):
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(activities=acts, record_shapes=self.record_shapes)
        self.prof.__enter__()
        flight_recorder.RECORDER.labels = True

    def _stop(self, trainer) -> None:
        if self.prof is None:
            return
        flight_recorder.RECORDER.labels = False
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        name = f"rank{trainer.comm.rank}.trace.json"
        rundir.export_at(self._fd, name, prof.export_chrome_trace)
        self.path = os.path.join(self.dir, name)
        self._close_dir()

    def _close_dir(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def on_train_start(self, trainer) -> None:
        if trainer.comm.rank in self.ranks and trainer.step < self.last and self._fd is None:
            self._open_dir(trainer)  # a refused directory fails now, not after hours of training
        if self.first <= trainer.step + 1 <= self.last:
            self._start(trainer)

    def on_step_end(self, trainer) -> None:
        if trainer.step == self.last:
            self._stop(trainer)
        elif trainer.step + 1 == self.first:
            self._start(trainer)

    def on_train_end(self, trainer, summary: dict) -> None:
        self._stop(trainer)
        self._close_dir()
        if self.path is not None:
            summary.setdefault("profiles", []).append(self.path)

    def on_exception(self, trainer, exc: BaseException) -> None:
        self._stop(trainer)
        self._close_dir()
