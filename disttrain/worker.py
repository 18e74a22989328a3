"""One training process: ``python -m disttrain.worker RUN_DIR/config.yaml``.

Started by ``disttrain run`` (through the launcher), or directly by torchrun, srun or
mpirun: it reads its place in the job from the environment (collectives.read_env).
"""

from __future__ import annotations

import logging
import os
import random
import sys

from launcher.slurm.signals import catch_signals_early

catch_signals_early()  # first thing: a SLURM warning signal while torch imports must not kill set-up

# The heavy imports below come after the signal handler above, on purpose.
import numpy as np  # noqa: E402
import torch  # noqa: E402

import collectives  # noqa: E402
from launcher.errors import LauncherError  # noqa: E402
from launcher.slurm.worker import setup_worker as setup_slurm_worker  # noqa: E402

from . import config as config_mod  # noqa: E402
from .checkpoint import maybe_build_checkpointer  # noqa: E402
from .data import build_task  # noqa: E402
from .models import build_model  # noqa: E402
from .rundir import RunDir  # noqa: E402
from .slurm import preemption  # noqa: E402
from .trainer import Trainer  # noqa: E402


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def connect_store(timeout: float):
    """The launcher's authenticated store when the launcher runs one, else None (backends use the env)."""
    if not os.environ.get("DISTTRAIN_STORE"):
        return None
    from launcher.torch_store import AuthStore

    return AuthStore.from_env(timeout=timeout)


def init_communicator(cfg: config_mod.ExperimentConfig) -> collectives.Communicator:
    env = collectives.read_env()
    device = "cpu"
    if cfg.launch.device == "cuda":
        torch.cuda.set_device(env.local_rank)
        device = f"cuda:{env.local_rank}"
    return collectives.init(
        cfg.launch.backend,
        store=connect_store(cfg.launch.timeout),
        env=env,
        check=cfg.launch.check_collectives,
        timeout=cfg.launch.timeout,
        device=device,
    )


def build_trainer(cfg: config_mod.ExperimentConfig, comm: collectives.Communicator) -> Trainer:
    seed_everything(cfg.run.seed)
    task = build_task(cfg.data, cfg.run.seed, seq_len=getattr(cfg.model, "seq_len", None))
    num_inputs = task.train_x.shape[1] if not task.is_lm else 0
    model = build_model(cfg.model, num_inputs, task.num_classes)
    device = getattr(comm.backend, "device", None) or "cpu"  # backends say None for "the CPU"
    return Trainer(
        cfg,
        comm,
        model,
        task,
        RunDir(cfg.run.dir, comm.rank),
        device=str(device),
        callbacks=preemption.build_callbacks(cfg, comm)  # preemption first, before checkpoints
        + [cb for cb in [maybe_build_checkpointer(cfg.checkpoint, comm)] if cb is not None],
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = config_mod.load(argv[0], argv[1:])
    except config_mod.ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    try:  # started by srun directly: SLURM's variables become ours; rank 0 hosts the job's store
        slurm_job = setup_slurm_worker(cfg.run.dir, nodes=cfg.slurm.nodes, ntasks_per_node=cfg.slurm.ntasks_per_node)
    except LauncherError as exc:
        print(f"disttrain worker: {exc}", file=sys.stderr)
        return 2
    comm = init_communicator(cfg)
    logging.basicConfig(level=logging.WARNING, format=f"[{comm.env.where}] %(levelname)s %(name)s: %(message)s")
    trainer = build_trainer(cfg, comm)
    summary = trainer.fit()
    if comm.rank == 0:
        trainer.run_dir.write_json("summary.json", summary)
        trainer.run_dir.plot_loss()
        acc = summary.get("final_eval_accuracy")
        acc_s = f", eval accuracy {acc:.2%}" if acc is not None else f", eval loss {summary['final_eval_loss']:.4f}"
        print(
            f"done: {summary['steps']} steps on {summary['world_size']} ranks in {summary['wall_time_s']:.1f}s, "
            f"final loss {float('nan') if summary['final_loss'] is None else summary['final_loss']:.4f}{acc_s}",
            flush=True,
        )
    trainer.run_dir.close()
    comm.barrier()  # nobody tears down the transport while a peer may still use it
    code = preemption.finish(trainer)  # a preempted SLURM job: rank 0 requeues it (everyone has saved)
    comm.close()
    if slurm_job is not None:
        slurm_job.close()
    return code


if __name__ == "__main__":
    sys.exit(main())
