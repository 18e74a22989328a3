"""Preemption: a warning signal becomes one agreed stop step, a checkpoint, a requeue, exit 0.

SLURM sends the configured signal (``slurm.signal``, default SIGUSR1, ``--signal=B:USR1@90``
forwarded by our batch script) before the time limit, and SIGTERM on preemption or at the
limit. The handler only sets a flag. Every ``slurm.check_every`` steps all ranks allreduce
the flag (MAX), so all stop after the same step even when the signal reached them at
different moments; then ``trainer.stop_requested`` is set and the checkpoint callback,
which runs after this one, saves that step synchronously. After the run (the worker's
final barrier: every rank has saved) rank 0 requeues the job (``scontrol requeue``, the
array task for arrays; else resubmits ``DISTTRAIN_SLURM_SCRIPT`` with sbatch) and every
worker exits 0; the requeued job resumes from the checkpoint.

Call order, every rank: the worker's ``build_callbacks(cfg, comm)`` (through
``maybe_build_preemption``: installs the handlers at once, so a signal during set-up is not
fatal) -> the trainer calls ``on_train_start``/``on_step_end``/``on_train_end`` -> the worker calls
``finish(trainer)`` after its final barrier and exits with the code it returns.
"""

from __future__ import annotations

import logging
import os
import signal

import torch

from collectives import Communicator, ReduceOp
from launcher import (
    SlurmEnvError,
    array_task_id,
    in_slurm,
    parse_signal,
    release_early_signals,
    requeue,
    requeue_id,
    restart_count,
    take_early_signal,
)

from ..config import ExperimentConfig, SlurmConfig
from ..observe.callbacks import Callback

log = logging.getLogger(__name__)

EX_TEMPFAIL = 75  # saved, but the job could not be requeued: SLURM marks it failed, the user resubmits


class Preemption(Callback):
    """The trainer callback. Put it FIRST in ``Trainer.callbacks``: the checkpoint callback must
    see ``stop_requested`` in the same ``on_step_end``."""

    def __init__(self, cfg: SlurmConfig, comm: Communicator, checkpointing: bool = True):
        self.cfg, self.comm, self.checkpointing = cfg, comm, checkpointing
        self.signals = sorted({parse_signal(cfg.signal), signal.SIGTERM})
        self.received: signal.Signals | None = None  # first signal seen by this rank
        self.stop_step: int | None = None  # the agreed step every rank stopped after
        self._old: dict = {}
        self._flag = torch.zeros(1)

    # -- signals ------------------------------------------------------------------------
    def install(self) -> None:
        """Main thread only (Python's rule); a no-op elsewhere."""
        try:
            self._old = {s: signal.signal(s, self._on_signal) for s in self.signals}
        except ValueError:
            log.warning("preemption: not the main thread; signals stay unhandled")
            return
        early = take_early_signal()  # one that came while the worker was still importing torch
        if early is not None and early in self.signals and self.received is None:
            self.received = signal.Signals(early)

    def uninstall(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}

    def _on_signal(self, signum, frame) -> None:
        # A signal handler: set the flag and return. Everything else happens at a step boundary.
        if self.received is None:
            self.received = signal.Signals(signum)

    # -- trainer hooks --------------------------------------------------------------------
    def on_train_start(self, trainer) -> None:
        if not self._old:
            self.install()

    def on_step_end(self, trainer) -> None:
        if trainer.step % self.cfg.check_every and trainer.step < trainer.cfg.train.steps:
            return
        self._flag.fill_(0.0 if self.received is None else 1.0)
        self.comm.allreduce(self._flag, ReduceOp.MAX)
        if self._flag.item() > 0 and trainer.step < trainer.cfg.train.steps and self.stop_step is None:
            self.stop_step = trainer.step
            trainer.stop_requested = True
            if self.comm.rank == 0:
                what = self.received.name if self.received is not None else "a peer's signal"
                print(f"preemption: {what}; all ranks stop after step {trainer.step} and save", flush=True)

    def on_train_end(self, trainer, summary: dict) -> None:
        summary["preempted_at_step"] = self.stop_step
        self.uninstall()

    # -- after the run --------------------------------------------------------------------
    def finish(self, trainer) -> int:
        """Every rank, after the worker's final barrier (all ranks saved). Rank 0 requeues.

        Returns the worker's exit code: 0, or EX_TEMPFAIL when rank 0 could not requeue."""
        if self.stop_step is None or self.comm.rank != 0:
            return 0
        if not in_slurm():
            print(f"preemption: stopped at step {self.stop_step} (not under SLURM: nothing to requeue)", flush=True)
            return 0
        if not self.cfg.requeue:
            print(f"preemption: stopped at step {self.stop_step}; slurm.requeue is off, not requeueing", flush=True)
            return 0
        if not self.checkpointing:
            print(
                "preemption: checkpoint.enabled is off, so a requeued job would start over; not requeueing. "
                "HINT: enable checkpoints to resume after preemption",
                flush=True,
            )
            return EX_TEMPFAIL
        restarts = restart_count()
        if restarts >= self.cfg.max_requeues:
            print(
                f"preemption: job already requeued {restarts} times (slurm.max_requeues={self.cfg.max_requeues});"
                " not requeueing again",
                flush=True,
            )
            return EX_TEMPFAIL
        try:
            done = requeue(requeue_id(), array_task_id(), os.environ.get("DISTTRAIN_SLURM_SCRIPT"))
        except SlurmEnvError as exc:
            print(f"preemption: checkpoint of step {self.stop_step} saved, but {exc}", flush=True)
            return EX_TEMPFAIL
        print(f"preemption: checkpoint of step {self.stop_step} saved; {done}", flush=True)
        return 0


def maybe_build_preemption(cfg: ExperimentConfig, comm: Communicator) -> Preemption | None:
    """The callback when ``slurm.preemption`` asks for it (``auto``: only inside a SLURM job).

    Installs the handlers right away, so a signal during set-up is not fatal."""
    mode = cfg.slurm.preemption
    if mode is False or (mode == "auto" and not in_slurm()):
        release_early_signals()
        return None
    cb = Preemption(cfg.slurm, comm, checkpointing=cfg.checkpoint.enabled)
    cb.install()
    return cb


def finish(trainer) -> int:
    """The worker's exit code after a run: asks the Preemption callback, if there is one."""
    for cb in trainer.callbacks:
        if isinstance(cb, Preemption):
            return cb.finish(trainer)
    return 0


def build_callbacks(cfg: ExperimentConfig, comm: Communicator) -> list:
    """``[Preemption]`` or ``[]``: what ``build_trainer`` puts first in ``Trainer.callbacks``."""
    cb = maybe_build_preemption(cfg, comm)
    return [cb] if cb is not None else []
