"""One training process: ``python -m disttrain.worker RUN_DIR/config.yaml``.

Started by ``disttrain run`` (through the launcher), or directly by torchrun, srun or
mpirun: it reads its place in the job from the environment (collectives.read_env).
"""

from __future__ import annotations

import faulthandler
import functools
import logging
import os
import random
import sys

from launcher import catch_signals_early

catch_signals_early()  # first thing: a SLURM warning signal while torch imports must not kill set-up

# The heavy imports below come after the signal handler above, on purpose.
import numpy as np  # noqa: E402
import torch  # noqa: E402

import collectives  # noqa: E402
from launcher import LauncherError, setup_slurm_worker  # noqa: E402

from . import config as config_mod  # noqa: E402
from .checkpoint import maybe_build_checkpointer  # noqa: E402
from .config import GPTConfig, TargetData, TargetModel  # noqa: E402
from .data import build_target_data, build_task  # noqa: E402
from .loss import build_step  # noqa: E402
from .models import build_model, build_target_model  # noqa: E402
from .models.deferred import record_build, set_pretrained  # noqa: E402
from .rundir import RunDir  # noqa: E402
from .slurm import preemption  # noqa: E402
from .targets import UserCodeError  # noqa: E402
from .teardown import leave  # noqa: E402
from .trainer import Trainer  # noqa: E402


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def connect_store(timeout: float):
    """The launcher's authenticated store when the launcher runs one, else None (backends use the env)."""
    if not os.environ.get("DISTTRAIN_STORE"):
        return None
    from launcher import AuthStore

    return AuthStore.from_env(timeout=timeout)


def init_communicator(cfg: config_mod.ExperimentConfig) -> collectives.Communicator:
    env = collectives.read_env()
    device = "cpu"
    if cfg.launch.device == "cuda" or (cfg.launch.device == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(env.local_rank)  # one process per GPU: LOCAL_RANK's
        device = f"cuda:{env.local_rank}"
    return collectives.init(
        cfg.launch.backend,
        store=connect_store(cfg.launch.timeout),
        env=env,
        check=cfg.launch.check_collectives,
        timeout=cfg.launch.timeout,
        device=device,
    )


def device_of(comm: collectives.Communicator) -> str:
    return str(comm.backend.device or "cpu")  # Backend declares device; None means the CPU


def build_callbacks(cfg: config_mod.ExperimentConfig, comm: collectives.Communicator) -> list:
    """Preemption first, then checkpoints (a stop request is saved in the same step)."""
    return preemption.build_callbacks(cfg, comm) + [
        cb for cb in [maybe_build_checkpointer(cfg.checkpoint, comm)] if cb is not None
    ]


def build_run_model(cfg: config_mod.ExperimentConfig, data, paths: list[str]):
    """The model of ``model:`` (a built-in kind or an import target). With ``model.deferred_init`` it is
    built on the meta device and materialised by the strategy, each rank keeping only its part; with
    ``model.pretrained`` those weights are read into it then. Every rank, after seeding; local."""
    mcfg = cfg.model
    if isinstance(mcfg, TargetModel):
        factory = functools.partial(build_target_model, mcfg, paths)
        what = f"model.target {mcfg.target}"
    else:
        factory = functools.partial(build_model, mcfg, data.num_inputs, data.num_classes)
        what = f"model.kind {mcfg.kind}"
    model = record_build(factory, what, transformers=isinstance(mcfg, TargetModel)) if mcfg.deferred_init else factory()
    if mcfg.pretrained:
        set_pretrained(model, mcfg.pretrained, mcfg.pretrained_strict)
    return model


def build_trainer(cfg: config_mod.ExperimentConfig, comm: collectives.Communicator) -> Trainer:
    """The trainer of an experiment: data, model and step function from the config (built-in kinds
    or import targets), the run directory, preemption and checkpoints. Every rank; seeds first."""
    seed_everything(cfg.run.seed)
    paths = cfg.run.import_path
    if isinstance(cfg.data, TargetData):
        data = build_target_data(cfg.data, paths)
    else:
        data = build_task(
            cfg.data, cfg.run.seed, seq_len=cfg.model.seq_len if isinstance(cfg.model, GPTConfig) else None
        )
    model = build_run_model(cfg, data, paths)
    return Trainer(
        cfg,
        comm,
        model,
        data,
        RunDir(cfg.run.dir, comm.rank, shared_group=cfg.run.shared_group),
        device=device_of(comm),
        callbacks=build_callbacks(cfg, comm),
        step_fn=build_step(cfg.loss, paths),
    )


def report(summary: dict) -> None:
    """Rank 0's last line of a run."""
    acc = summary.get("final_eval_accuracy")
    loss = summary.get("final_eval_loss")
    acc_s = f", eval accuracy {acc:.2%}" if acc is not None else f", eval loss {loss:.4f}" if loss is not None else ""
    final = summary["final_loss"]
    print(
        f"done: {summary['steps']} steps on {summary['world_size']} ranks in {summary['wall_time_s']:.1f}s, "
        f"final loss {float('nan') if final is None else final:.4f}{acc_s}",
        flush=True,
    )


def close(trainer: Trainer, summary: dict, slurm_job) -> int:
    """Every rank, after the run: summary and plot (rank 0), barrier, requeue if preempted, close.
    Returns the process's exit code."""
    if summary.get("already_finished"):  # a re-run of a finished run: its files stay as they are
        if trainer.comm.rank == 0:
            print(f"done: {trainer.cfg.run.dir} already finished at step {summary['steps']}; nothing to do", flush=True)
    elif trainer.comm.rank == 0:
        if trainer.run_dir is not None:
            trainer.run_dir.write_json("summary.json", summary)
            trainer.run_dir.plot_loss()
        report(summary)
    if trainer.run_dir is not None:
        trainer.run_dir.close()
    trainer.comm.barrier()  # nobody tears down the transport while a peer may still use it
    code = preemption.finish(trainer)  # a preempted SLURM job: rank 0 requeues it (everyone has saved)
    trainer.comm.close()
    if slurm_job is not None:
        slurm_job.close()
    return code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # A native crash (an abort in a transport's thread, a segfault) prints every thread's Python
    # stack to this rank's log, next to the rank@host prefix, instead of a bare "Aborted".
    faulthandler.enable(all_threads=True)
    try:
        # A resolved config handed over by `disttrain run`/`submit` comes with its SHA-256: checked before
        # any of it is used or any target imported, and its directory (the run dir) not put on the path.
        cfg = config_mod.load(argv[0], argv[1:], sha256=os.environ.pop("DISTTRAIN_CONFIG_SHA256", None) or None)
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
    try:
        trainer = build_trainer(cfg, comm)
        summary = trainer.fit()
    except UserCodeError as exc:  # the user's target, data or step function: the message says what to fix
        print(f"disttrain worker {comm.env.where}: {exc}", file=sys.stderr, flush=True)
        return 1
    except config_mod.ConfigError as exc:  # a tp plan or pipeline split that does not fit the built model
        print(f"disttrain worker {comm.env.where}: {exc}", file=sys.stderr, flush=True)
        return 2
    return close(trainer, summary, slurm_job)


if __name__ == "__main__":
    leave(main())
