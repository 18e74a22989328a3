"""Rank functions for the preemption callback (real ranks, real signals, no SLURM)."""

from __future__ import annotations

import os
import signal

import collectives
from disttrain import config as config_mod
from disttrain.observe import Callback
from disttrain.session import build_trainer
from disttrain.slurm.preemption import Preemption


class _SignalSelf(Callback):
    """After step ``step`` on rank ``rank`` only: SIGUSR1 to this process (as SLURM would)."""

    def __init__(self, rank: int, step: int):
        self.rank, self.step = rank, step

    def on_step_end(self, trainer) -> None:
        if trainer.comm.rank == self.rank and trainer.step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)


def signal_one_rank(config: str, signal_rank: int, signal_step: int) -> dict:
    cfg = config_mod.load(
        config,
        [
            "train.steps=40",
            "train.log_every=100",
            "train.eval_every=0",
            "slurm.preemption=true",
            "checkpoint.enabled=false",
        ],
    )
    comm = collectives.init("torch", timeout=60)
    trainer = build_trainer(cfg, comm)
    trainer.run_dir = None
    pre = trainer.callbacks[0]
    assert isinstance(pre, Preemption), trainer.callbacks  # first, before any checkpoint callback
    trainer.callbacks.append(_SignalSelf(signal_rank, signal_step))
    summary = trainer.fit()
    comm.barrier()
    comm.close()
    return {
        "stop_step": pre.stop_step,
        "steps": summary["steps"],
        "received": pre.received.name if pre.received is not None else None,
    }


def stop_at_log_step(config: str, run_dir: str, signal_step: int) -> dict:
    """A preemption agreed at a metrics-line step (rank 0 signalled after it), with the run directory
    and a CSV tracker kept: the stop step's line must be written once, with the final evaluation."""
    cfg = config_mod.load(
        config,
        [
            f"run.dir={run_dir}",
            "train.steps=40",
            "train.log_every=2",
            "train.eval_every=0",
            "train.eval_samples=64",
            "slurm.preemption=true",
            "checkpoint.enabled=false",
            "log.trackers=[csv]",
        ],
    )
    comm = collectives.init("torch", timeout=60)
    trainer = build_trainer(cfg, comm)
    pre = trainer.callbacks[0]
    assert isinstance(pre, Preemption), trainer.callbacks
    trainer.callbacks.append(_SignalSelf(0, signal_step))
    summary = trainer.fit()
    comm.barrier()
    if trainer.run_dir is not None:
        trainer.run_dir.close()
    comm.close()
    return {"stop_step": pre.stop_step, "steps": summary["steps"]}
