"""Rank functions: an async save equals a sync save of the same step, bit for bit, while
training goes on; a failed background write surfaces at the next step naming the rank."""

from __future__ import annotations

import os

import collectives
from disttrain import config as config_mod
from disttrain.checkpoint import Checkpointer, CheckpointError, testhooks
from disttrain.session import build_trainer
from tests.cases.ckpt_train import DIGITS


def async_vs_sync(dir_sync: str, dir_async: str) -> dict:
    cfg = config_mod.load(DIGITS, ["train.steps=20", "checkpoint.every=0", "launch.backend=torch"])
    comm = collectives.init("torch", timeout=60)
    trainer = build_trainer(cfg, comm)
    sync, bg = Checkpointer(cfg.checkpoint, comm), Checkpointer(cfg.checkpoint, comm)
    trainer.callbacks = [sync, bg]  # their before_optimizer_step waits for a snapshot in flight
    sync.attach(trainer, dir_sync)
    bg.attach(trainer, dir_async)
    for _ in range(3):
        trainer.train_step()
    sync.save(trainer, sync=True)
    bg.save(trainer, sync=False)  # returns before the bytes are copied; the optimizer step waits for them
    for _ in range(3):
        trainer.train_step()  # mutates every parameter and optimizer state while the save is in flight
        bg.on_step_end(trainer)
    bg.wait()
    # A background write that fails on rank 1 is reported on every rank at the next step.
    os.environ[testhooks.ENV] = "raise@write:1"
    bg.save(trainer, sync=False)
    error = None
    try:
        for _ in range(3):
            trainer.train_step()
            bg.on_step_end(trainer)
        bg.wait()
    except CheckpointError as exc:
        error = str(exc)
    del os.environ[testhooks.ENV]
    comm.barrier()
    comm.close()
    return {"error": error, "step": trainer.step}
