"""One rank's run set-up, in one place: :class:`Session` joins the job (SLURM worker, communicator,
logging, seed), then opens the run directory, builds the callbacks, the model, data and step of the
config, and the trainer with its strategy and checkpointer; at the end it closes all of it.
``disttrain run`` (through :mod:`disttrain.worker`), ``disttrain.init`` and ``disttrain.fit`` all use it.
This module installs no signal handler when imported (only the process entry ``disttrain.worker`` does).
"""

from __future__ import annotations

import functools
import logging
import os
import random
from collections.abc import Sequence

import numpy as np
import torch

import collectives
from launcher import setup_slurm_worker

from . import config as config_mod
from .checkpoint import maybe_build_checkpointer
from .config import GPTConfig, TargetData, TargetModel
from .data import build_target_data, build_task
from .fault import maybe_build_fault_tolerance, maybe_fall_back
from .loss import build_step
from .models import build_model, build_target_model
from .models.deferred import record_build, set_pretrained
from .observe.callbacks import Callback
from .rundir import RunDir
from .slurm import preemption
from .trainer import Trainer


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
    """Preemption first, then checkpoints (a stop request is saved in the same step), then the peer
    replicas (``fault_tolerance``; their recovery goes through the checkpointer's resume)."""
    ckpt = maybe_build_checkpointer(cfg.checkpoint, comm)
    replicas = maybe_build_fault_tolerance(cfg.fault_tolerance, comm, ckpt)
    return preemption.build_callbacks(cfg, comm) + [cb for cb in [ckpt, replicas] if cb is not None]


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


class Session:
    """One rank's run: its config, communicator and SLURM job; the run directory and callbacks are made on
    first use (``run_dir``, ``callbacks``), so each entry keeps its own order of set-up steps. ``callbacks``
    given here run after the built-in ones (preemption, then checkpoints)."""

    def __init__(
        self,
        cfg: config_mod.ExperimentConfig,
        comm: collectives.Communicator,
        slurm_job=None,
        callbacks: Sequence[Callback] = (),
    ):
        self.cfg, self.comm, self.slurm_job = cfg, comm, slurm_job
        self.device = device_of(comm)
        self._extra = list(callbacks)

    @classmethod
    def start(
        cls, cfg: config_mod.ExperimentConfig, *, process: bool = False, callbacks: Sequence[Callback] = ()
    ) -> Session:
        """Every rank, first: join the job (started by srun directly: SLURM's variables become ours and rank 0
        hosts the job's store; raises LauncherError when they do not fit), log with a rank@host prefix and
        seed every RNG. A ``parallel.mesh`` that does not fit the world size takes the first
        ``fault_tolerance.fallback`` layout that does (LayoutError when none does). ``process``: this process is ours (the worker), so the root logger is configured;
        otherwise only the ``disttrain`` logger gets a handler, the root logger stays the user's."""
        slurm_job = setup_slurm_worker(cfg.run.dir, nodes=cfg.slurm.nodes, ntasks_per_node=cfg.slurm.ntasks_per_node)
        comm = init_communicator(cfg)
        fmt = f"[{comm.env.where}] %(levelname)s %(name)s: %(message)s"
        if process:
            logging.basicConfig(level=logging.WARNING, format=fmt)
        else:
            ours = logging.getLogger("disttrain")
            if not ours.handlers:
                handler = logging.StreamHandler()
                handler.setFormatter(logging.Formatter(fmt))
                ours.addHandler(handler)
        cfg = maybe_fall_back(cfg, comm.world_size, comm.env.where)  # a lost host may leave too few ranks
        seed_everything(cfg.run.seed)
        return cls(cfg, comm, slurm_job, callbacks)

    @functools.cached_property
    def run_dir(self) -> RunDir:
        return RunDir(self.cfg.run.dir, self.comm.rank, shared_group=self.cfg.run.shared_group)

    @functools.cached_property
    def callbacks(self) -> list:
        return build_callbacks(self.cfg, self.comm) + self._extra

    def trainer(self, model, data, *, cfg: config_mod.ExperimentConfig | None = None, **parts) -> Trainer:
        """A trainer of ``model`` and ``data`` (None: the user's loop feeds it) in this session; ``parts`` are
        the Trainer's keyword arguments (step_fn, optimizer, scheduler); ``cfg`` in place of the session's."""
        return Trainer(cfg or self.cfg, self.comm, model, data, self.run_dir, self.device, self.callbacks, **parts)

    def build_trainer(self) -> Trainer:
        """The trainer of the experiment: data, model and step function from the config (built-in kinds
        or import targets), the run directory, preemption and checkpoints. Every rank; seeds first."""
        cfg = self.cfg
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
            self.comm,
            model,
            data,
            self.run_dir,
            device=self.device,
            callbacks=self.callbacks,
            step_fn=build_step(cfg.loss, paths),
        )

    def close_for_rebuild(self) -> None:
        """This rank, after its communicator was aborted and closed for an in-place world change
        (``disttrain.fault.inplace``): let go of the run directory's open files; the next round's
        session opens its own."""
        if "run_dir" in self.__dict__:  # built (cached_property)
            self.run_dir.close()

    def close(self, trainer: Trainer, summary: dict) -> int:
        """Every rank, after the run: summary and plot (rank 0), barrier, requeue if preempted, close.
        Returns the process's exit code."""
        if summary.get("already_finished"):  # a re-run of a finished run: its files stay as they are
            if trainer.comm.rank == 0:
                print(
                    f"done: {trainer.cfg.run.dir} already finished at step {summary['steps']}; nothing to do",
                    flush=True,
                )
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
        if self.slurm_job is not None:
            self.slurm_job.close()
        return code


def build_trainer(cfg: config_mod.ExperimentConfig, comm: collectives.Communicator) -> Trainer:
    """The trainer of an experiment, on a joined communicator (:meth:`Session.build_trainer`)."""
    return Session(cfg, comm).build_trainer()
