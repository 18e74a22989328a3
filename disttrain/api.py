"""The Python API: disttrain inside the user's own script and loop.

    run = disttrain.init("run.yaml", sys.argv[1:])          # config + overrides; comm, seed, run dir
    model, opt = run.setup(MyModel(), lambda groups: torch.optim.AdamW(groups, lr=3e-4))
    for batch in run.batches(train_set, collate_fn=collate):  # resumes at the exact sample
        loss_sum, count = my_step(model, batch)
        run.backward(loss_sum, count)
        run.step()                                          # reduce, clip, schedule, optimizer, checkpoint

or the built-in loop with the user's parts: ``disttrain.fit(model=..., data=(train, eval),
step=my_step, config="run.yaml")``. Every rank runs the same script: under ``disttrain launch``,
torchrun, srun or mpiexec (the place in the job comes from their environment variables), or
as one plain process. A run directory with checkpoints resumes from its latest one.

``run.step()`` after every ``run.backward()``: it acts at the end of each optimizer step
(``train.grad_accum`` micro-batches) and returns True then. A rank with no sample in a step
(global batch smaller than the world) takes part in it without running the loop body.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn

from . import config as config_mod
from .data import Data, as_data
from .errors import DisttrainError
from .loss import StepFn
from .observe.callbacks import Callback
from .parallel.strategy import OptimizerSpec
from .precision import autocast
from .schedule import SchedulerFactory
from .session import Session
from .trainer import Trainer

log = logging.getLogger(__name__)

OptimizerFactory = Callable[[list[dict]], torch.optim.Optimizer]


def _load(
    config: str | config_mod.ExperimentConfig | None, argv: Sequence[str], settings: dict[str, Any]
) -> config_mod.ExperimentConfig:
    """The config: a path, a loaded config, argv[0] when it names a YAML file, or none (the defaults),
    with keyword ``settings`` (one mapping per section) and ``key=value`` overrides on top.
    Raises :class:`ConfigError` (catchable; ``str()`` is the report) on anything that does not validate."""
    argv = list(argv)
    if config is None and argv and argv[0].endswith((".yaml", ".yml")):
        config, argv = argv[0], argv[1:]
    if isinstance(config, config_mod.ExperimentConfig):
        if not argv and not settings:
            return config
        settings = {**config.model_dump(mode="json"), **settings}
        config = None
    if config is None or settings:
        return config_mod.from_settings(settings, argv, base=config)
    return config_mod.load(config, argv)


class Run:
    """One rank's run, from the user's script. Build it with :func:`init`; every rank calls the same
    methods in the same order (they are collective where training is). Its set-up is ``session``'s."""

    def __init__(self, session: Session):
        self.session, self.cfg, self.comm = session, session.cfg, session.comm
        self.device = session.device
        self.run_dir = session.run_dir
        self.trainer: Trainer | None = None
        self.summary: dict | None = None
        self.exit_code = 0

    # -- where am I ---------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def world_size(self) -> int:
        return self.comm.world_size

    @property
    def is_main(self) -> bool:
        """True on rank 0 (print and write files there)."""
        return self.comm.rank == 0

    @property
    def global_step(self) -> int:
        """Optimizer steps completed (after a resume: counted from the start of the run)."""
        return self.trainer.step if self.trainer is not None else 0

    def autocast(self):
        """The autocast context of ``train.precision`` (bf16/fp16), or a no-op for fp32. The model that
        ``setup`` returns already runs its forward under it; this is for other code (a loss head)."""
        return self._trainer().autocast()

    # -- the verbs ----------------------------------------------------------------------------
    def setup(
        self,
        model: nn.Module,
        optimizer: OptimizerFactory | OptimizerSpec | None = None,
        scheduler: SchedulerFactory | None = None,
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Wrap ``model`` with the strategy of ``parallel`` (weights broadcast from rank 0) and build the
        optimizer: ``optimizer(param_groups)`` (biases and norm weights get weight_decay 0, per
        ``optim.no_decay``), or the ``optim`` section when None. Returns (model, optimizer) to use; call
        ``model(...)`` as usual (its forward autocasts to ``train.precision``), but step through
        ``run.step()``, not ``optimizer.step()``. ``scheduler(optimizer)`` (e.g. ``lambda o:
        torch.optim.lr_scheduler.StepLR(o, 10)``) builds the learning-rate scheduler ``run.step()`` steps
        and checkpoints, in place of ``schedule``. Pipeline parallel (``parallel.mesh.pp`` > 1) is refused
        here: use ``disttrain.fit`` with a step function. Collective."""
        if self.trainer is not None:
            raise DisttrainError("run.setup() was already called; one model per run")
        if self.cfg.parallel.mesh.pp > 1:
            raise DisttrainError(
                f"rank {self.comm.env.where}: parallel.mesh.pp={self.cfg.parallel.mesh.pp}: a pipeline runs the "
                "model a stage at a time on its own schedule, which a loop calling model(...) and "
                "run.backward() cannot drive\nHINT: keep pipeline parallel with the built-in loop: "
                "disttrain.fit(model=..., data=..., step=my_step) or `disttrain run` with loss.target (your "
                "step function runs on each micro-batch); or use tp/dp/ZeRO in this loop"
            )
        cfg = self.cfg
        if cfg.parallel.tp.loss_parallel is None:  # the user's own loss gets whole logits unless it asks
            tp = cfg.parallel.tp.model_copy(update={"loss_parallel": False})
            cfg = cfg.model_copy(update={"parallel": cfg.parallel.model_copy(update={"tp": tp})})
        self.trainer = self.session.trainer(model, None, cfg=cfg, optimizer=optimizer, scheduler=scheduler)
        wrapped = self.trainer.strategy.model
        if cfg.train.precision != "fp32":  # train.precision applies to the user's forward calls too
            wrapped.forward = autocast_forward(wrapped.forward, cfg.train.precision, self.device)
        return wrapped, self.trainer.strategy.optimizer

    def batches(
        self, dataset, collate_fn: Callable[[list], Any] | None = None, num_workers: int | None = None
    ) -> Iterator[Any]:
        """This rank's micro-batches of ``dataset`` (a map-style Dataset, or a stream: an IterableDataset,
        which needs ``train.steps``), on the device, from the
        run's current step (a resumed run continues at the exact sample) until ``train.steps`` or a
        preemption stop. The first call resumes from the run directory's latest checkpoint; the end
        of the loop saves the final one. ``num_workers`` defaults to ``data.num_workers``."""
        t = self._trainer()
        t.attach_data(Data(dataset, None, collate_fn), num_workers)
        t.start()
        while t.step < self.cfg.train.steps and not t.stop_requested:
            before, got = t.step, False
            for batch in t.micro_batches():
                got = True
                yield batch
            if not got:  # nothing for this rank in this step: it still takes part in the collectives
                self._end_step()
            elif t.step == before:
                raise DisttrainError(
                    f"rank {self.comm.env.where}: step {before} ended without run.step()\n"
                    "HINT: call run.backward(loss_sum, count) and then run.step() for every batch"
                )
        self.summary = t.finish()

    def backward(self, loss_sum: torch.Tensor, count: float | torch.Tensor, metrics: dict | None = None) -> None:
        """Backward of ``loss_sum``, the loss summed over ``count`` units (samples, or tokens that count).
        The gradient becomes the mean over every unit of the global batch. ``metrics`` (what a step
        function may return third: sums over the units) reach the metrics line reduced over ranks."""
        self._trainer().backward(loss_sum, count, metrics)

    def log(self, metrics: dict[str, float], reduce: dict[str, str] | None = None) -> None:
        """Add ``metrics`` to the next metrics line (metrics.jsonl, the progress line, every tracker):
        reduced over the ranks and averaged over the log window, by the mean unless a name ends in
        ``_sum``/``_max``/``_min`` or ``reduce`` says (``{"name": "max"}``). Local, cheap; any rank."""
        self._trainer().log(metrics, reduce)

    def step(self) -> bool:
        """At the end of an optimizer step (the last micro-batch): reduce gradients, divide by the global
        count, clip, schedule the lr, step the optimizer, log, checkpoint and honour a preemption
        request; True then. Elsewhere a no-op (False). Collective at step ends."""
        t = self._trainer()
        if not t.at_boundary:
            return False
        self._end_step()
        return True

    def evaluate(self, dataset, step: StepFn | None = None, collate_fn=None, max_samples: int | None = None) -> dict:
        """Mean loss (and the step's metrics per unit) on ``dataset``, split over the ranks. Collective."""
        return self._trainer().evaluate(max_samples, dataset=dataset, step_fn=step, collate=collate_fn)

    def finish(self) -> int:
        """Summary (rank 0), barrier, a SLURM requeue after preemption, close the communicator. Returns the
        exit code for ``sys.exit``. Collective; optional at the very end of a script."""
        if self.trainer is None:
            self.comm.barrier()
            self.comm.close()
            return 0
        summary = self.summary or self.trainer.finish()
        self.exit_code = self.session.close(self.trainer, summary)
        return self.exit_code

    # -- internals ----------------------------------------------------------------------------
    def _trainer(self) -> Trainer:
        if self.trainer is None:
            raise DisttrainError("call run.setup(model, optimizer) first")
        return self.trainer

    def _end_step(self) -> None:
        t = self._trainer()
        _, norm, _ = t.end_step()
        t.after_step(norm, t.evaluate if t.data is not None and t.data.eval is not None else None)


def autocast_forward(forward: Callable, precision: str, device: str) -> Callable:
    """``forward`` run under the autocast context of ``precision`` (as accelerate wraps a prepared
    model's forward); outputs keep the autocast dtype (cast logits with ``.float()`` in the loss)."""

    @functools.wraps(forward)
    def run(*args, **kwargs):
        with autocast(precision, device):
            return forward(*args, **kwargs)

    return run


def restart_recovery_only(session: Session, entry: str) -> None:
    """A lost host under a user's script: the agents' replica stores and the checkpointer's resume from peer
    memory serve ``init`` and ``fit`` as they serve ``disttrain run`` (the same session callbacks), but
    ``fault_tolerance.recover: in_place`` needs the worker's loop, which rebuilds model and data from the
    config in the same process; the script's model object cannot be. Rank 0 says so, once: its agent
    restarts the script instead (it resumes from the same copies in memory)."""
    if session.cfg.fault_tolerance.recover == "in_place" and session.comm.rank == 0:
        log.warning(
            "rank %s: fault_tolerance.recover is in_place, but %s holds your model object, which cannot be "
            "rebuilt at a new world size in this process; a lost host restarts this script instead (it resumes "
            "from the same copies in peer memory)\nHINT: for recovery in place give model, data and loss as "
            "import targets (model.target, data.target, loss.target) and start `disttrain run`",
            session.comm.env.where,
            entry,
        )


def init(config: str | config_mod.ExperimentConfig | None = None, argv: Sequence[str] = (), **settings: Any) -> Run:
    """Every rank, first: read the config (a YAML path, or none), keyword settings such as
    ``train={"steps": 100}`` and ``key=value`` overrides (a bad one raises :class:`ConfigError`),
    join the job (launcher, torchrun, srun, mpiexec or one process), seed every RNG, open the run
    directory and install the preemption handlers. Blocks until every rank has joined."""
    session = Session.start(_load(config, argv, settings))
    restart_recovery_only(session, "a script's own loop")
    return Run(session)


def fit(
    model: nn.Module,
    data,
    step: StepFn | None = None,
    config: str | config_mod.ExperimentConfig | None = None,
    argv: Sequence[str] = (),
    optimizer: OptimizerFactory | OptimizerSpec | None = None,
    collate_fn: Callable[[list], Any] | None = None,
    callbacks: list[Callback] | None = None,
    scheduler: SchedulerFactory | None = None,
) -> dict:
    """The built-in loop with the user's parts: ``model``, ``data`` (a ``(train, eval)`` pair of
    Datasets (map-style or IterableDataset streams), eval may be None, or one Dataset), ``step(model, batch) -> (loss_sum, count
    [, metrics])`` (default: cross-entropy), the config's strategy, schedule, logging, evaluation,
    checkpoints and resume. Every rank; returns the summary. Build the model after ``init`` or with
    the same seed on every rank (rank 0's weights are broadcast anyway). ``callbacks``: Callback objects
    run after the built-in ones; ``scheduler(optimizer)``: a torch lr scheduler in place of ``schedule``."""
    session = Session.start(_load(config, argv, {}), callbacks=callbacks or ())
    restart_recovery_only(session, "disttrain.fit")
    run = Run(session)
    run.trainer = run.session.trainer(
        model, as_data(data, collate_fn), step_fn=step, optimizer=optimizer, scheduler=scheduler
    )
    run.summary = run.trainer.fit()
    run.finish()
    return run.summary
