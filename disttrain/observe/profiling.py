"""Profiles: ``profile: {steps: [a, b], ranks: [0]}`` records steps a..b (1-based, inclusive) of the
listed ranks with ``torch.profiler`` and writes ``RUN_DIR/profiles/rank<R>.trace.json`` (Chrome /
Perfetto format: chrome://tracing, ui.perfetto.dev), every collective a named range
(``allreduce#12 (world)``, from the flight recorder). A callback: it starts after step a-1 ends
(or at the start) and stops after step b; ranks not listed do nothing.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from collectives import flight_recorder

from .callbacks import Callback

if TYPE_CHECKING:
    from ..config.log import ProfileConfig


class Profiler(Callback):
    def __init__(self, cfg: ProfileConfig, run_dir: str):
        self.first, self.last = cfg.steps
        self.ranks, self.record_shapes = set(cfg.ranks), cfg.record_shapes
        self.dir = os.path.join(run_dir, "profiles")
        self.prof: torch.profiler.profile | None = None
        self.path: str | None = None

    def _start(self, trainer) -> None:
        if trainer.comm.rank not in self.ranks or self.prof is not None:
            return
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
        os.makedirs(self.dir, exist_ok=True)
        self.path = os.path.join(self.dir, f"rank{trainer.comm.rank}.trace.json")
        prof.export_chrome_trace(self.path)

    def on_train_start(self, trainer) -> None:
        if self.first <= trainer.step + 1 <= self.last:
            self._start(trainer)

    def on_step_end(self, trainer) -> None:
        if trainer.step == self.last:
            self._stop(trainer)
        elif trainer.step + 1 == self.first:
            self._start(trainer)

    def on_train_end(self, trainer, summary: dict) -> None:
        self._stop(trainer)
        if self.path is not None:
            summary.setdefault("profiles", []).append(self.path)

    def on_exception(self, trainer, exc: BaseException) -> None:
        self._stop(trainer)
