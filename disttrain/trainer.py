"""The training engine of one rank: data position, micro-batches, gradients, optimizer, callbacks.

Two ways in, on every rank:
- ``fit()``: the built-in loop (the step function of ``loss``, logging, evaluation).
- the verbs the Python API calls from the user's own loop (``disttrain.init``): per micro-batch
  ``micro_batches()`` -> the user's forward -> ``backward(loss_sum, count)``, then ``end_step()``
  and ``after_step()``.

Losses are sums over units (samples or tokens). ``backward`` divides by the expected global count
(global batch size x the data's fixed units per sample, else the batch size: a constant every rank
knows) before autograd; ``end_step`` adds this step's counts over every rank and micro-batch (one
tiny allreduce) and scales the reduced gradients by ``expected / global count`` when they differ
(padding, ignored labels), so the gradient equals one process's on the same global batch,
whatever the world size, micro-batching or padding (the equivalence tests rely on this).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn

from collectives import Communicator, ReduceOp, flight_recorder

from . import evaluation
from .config import ExperimentConfig
from .data import Data, GlobalBatchSampler, StepLoader, StreamSampler, Task
from .data.dataset import to_device
from .data.loader import micro_slices
from .data.stream import build_sampler
from .errors import DisttrainError
from .loss import CrossEntropyStep, SplitLogitsStep, StepFn, StepOutputError, read_step_output
from .models.deferred import pending
from .observe import flops, throughput
from .observe.callbacks import Callback, build_callbacks, check_callbacks
from .observe.metrics import MetricWindow
from .observe.profiling import Profiler
from .observe.progress import ProgressLine
from .observe.straggler import Stragglers
from .observe.trackers import TrackerCallback
from .optim import build_optimizer, build_optimizer_spec, user_optimizer_spec
from .parallel import OptimizerSpec, build_strategy, schedules_micro_batches
from .parallel.pipeline.step import is_transformers_model, run_step_fn
from .precision import autocast, maybe_loss_scaler
from .rundir import RunDir
from .schedule import BuiltinSchedule, SchedulerFactory, build_schedule

log = logging.getLogger(__name__)
# Indices of Trainer._sums, one float64 allreduce per step: units counted, loss summed, samples read.
_COUNT, _LOSS_SUM, _SAMPLES = 0, 1, 2

__all__ = ["Trainer", "build_optimizer"]


class Trainer:
    def __init__(
        self,
        cfg: ExperimentConfig,
        comm: Communicator,
        model: nn.Module,
        data: Data | Task | None = None,
        run_dir: RunDir | None = None,
        device: str = "cpu",
        callbacks: list[Callback] | None = None,
        step_fn: StepFn | None = None,
        optimizer: OptimizerSpec | Callable[[list[dict]], torch.optim.Optimizer] | None = None,
        scheduler: SchedulerFactory | None = None,
    ):
        self.cfg, self.comm, self.device, self.run_dir = cfg, comm, device, run_dir
        self.task = data if isinstance(data, Task) else None  # a built-in kind: (x, y) tensors
        self.data = data.data() if isinstance(data, Task) else data
        self.step_fn = step_fn or CrossEntropyStep(cfg.loss.ignore_index, cfg.loss.shift_labels)
        if isinstance(self.step_fn, CrossEntropyStep):  # label shifting decided for this model
            self.step_fn = self.step_fn.for_model(model)
        self.model = model if pending(model) else model.to(device)  # a deferred model moves as it materialises
        if optimizer is None:
            spec = build_optimizer_spec(cfg.optim, self.model)
        else:
            spec = user_optimizer_spec(optimizer, self.model, cfg.optim.no_decay)
        pcfg = cfg.parallel
        if pcfg.tp.loss_parallel is None:  # auto: logits stay split for steps that read them so (the built-in)
            split = isinstance(self.step_fn, SplitLogitsStep)
            pcfg = pcfg.model_copy(update={"tp": pcfg.tp.model_copy(update={"loss_parallel": split})})
        self.strategy = build_strategy(pcfg, self.model, spec, comm)
        # The user's optimizer keeps its own learning rates: a built-in schedule scales each group's.
        self.schedule = build_schedule(
            cfg.schedule,
            lambda: self.strategy.optimizer,  # a test may swap the strategy after construction
            cfg.train.steps,
            cfg.optim.lr if optimizer is None else None,
            scheduler,
        )
        # Model-parallel strategies name this rank's data-parallel replica: its tp/pp peers read the
        # same samples and report the same loss (counted once in the logged metrics).
        self.dp_rank, self.dp_size = self.strategy.dp_rank, self.strategy.dp_size
        self._lr = self.lr(0)  # the learning rate of the last step (logged)
        self.sampler: GlobalBatchSampler | StreamSampler | None = None
        self._loader: StepLoader | None = None
        self._num_workers = 0
        if self.data is not None:
            self.attach_data(self.data)
        self.step = 0  # optimizer steps completed; also the data position
        self.stop_requested = False  # set from a signal handler (preemption); honoured at a step boundary
        self.history: list[dict] = []
        # Called in order on every rank (disttrain.observe.callbacks): the given ones (preemption before
        # checkpointing, so a stop request is saved the same step), the config's, the progress line, trackers.
        self.callbacks: list[Callback] = check_callbacks(callbacks or [])
        self.callbacks += build_callbacks(cfg.callbacks, cfg.run.import_path)
        self.callbacks.append(ProgressLine())
        if cfg.profile.steps is not None and run_dir is not None:
            self.callbacks.append(Profiler(cfg.profile, run_dir.path))
        if cfg.log.trackers and run_dir is not None:
            self.callbacks.append(TrackerCallback(cfg.log.trackers, cfg.log, run_dir.path, cfg.run.name))
        self.last_record: dict | None = None  # this step's metrics line (None when it logged nothing)
        self.already_finished = False  # resumed at or past train.steps: nothing to do, nothing to change
        self._final_eval: dict | None = None  # the last step's evaluation, done with its metrics line
        self.metrics = MetricWindow()  # the step function's and run.log()'s metrics of the log window
        self.clock = throughput.StepClock()
        self.stragglers = Stragglers(comm, cfg.log.straggler_threshold_s) if cfg.log.stragglers else None
        if run_dir is not None:  # hang dumps (launch.hang_timeout) also land in RUN_DIR/traces
            flight_recorder.also_dump_to(os.path.join(run_dir.path, "traces"))
        self._flops = flops.build_flops(cfg.model, self.model, cfg.log.flops_per_sample, device)
        # fp16: dynamic loss scaling over the strategy's (possibly sharded) gradients; None otherwise.
        self.scaler = maybe_loss_scaler(cfg.train.precision)
        self._started = False
        self._open: contextlib.AbstractContextManager | None = None  # the accumulate context of a micro-batch
        self._trailing: list[int] = []  # this step's empty micro-batches after the last non-empty one
        self.at_boundary = False  # the micro-batch handed out last is this step's last non-empty one
        self._sums = [0.0, 0.0, 0.0]  # this rank's [_COUNT], [_LOSS_SUM] and [_SAMPLES] in the current step
        self._window = {"loss": 0.0, "steps": 0, "samples": 0.0, "count": 0.0, "start": time.perf_counter()}
        self.started_at = time.perf_counter()

    # -- data --------------------------------------------------------------------------------
    def attach_data(self, data: Data, num_workers: int | None = None) -> None:
        """Train on ``data`` from the current step on (the data position is the step number)."""
        self.data = data
        self.sampler = build_sampler(data.train, self.cfg.train, self.cfg.run.seed, self.dp_rank, self.dp_size)
        self._num_workers = self.cfg.data.num_workers if num_workers is None else num_workers
        self._close_loader()

    def _close_loader(self) -> None:
        if self._loader is not None:
            self._loader.close()
        self._loader = None

    def micro_batches(self) -> Iterator[Any]:
        """This rank's non-empty micro-batches of the current step, on the device. Each is handed out
        inside the strategy's ``accumulate`` context, which ``backward`` closes."""
        if self.data is None or self.sampler is None:
            raise DisttrainError("no training data: pass a dataset (run.batches(dataset) or Trainer(data=...))")
        if self._loader is None or self._loader.next_step != self.step:
            self._close_loader()
            self._loader = StepLoader(
                self.data.train,
                self.sampler,
                self.cfg.train.grad_accum,
                self.step,
                self.data.collate,
                self._num_workers,
                self.cfg.data.worker_start,
            )
        if self.stragglers is not None:
            self.stragglers.begin_step()
        accum = self.cfg.train.grad_accum
        sizes = [len(mb) for mb in micro_slices(self.sampler.local_batch(self.step), accum)]
        last_full = max((i for i, n in enumerate(sizes) if n), default=-1)
        self._trailing = list(range(last_full + 1, accum))
        clock, it = self.clock, iter(self._loader.micro_batches(self.step))
        for i in range(accum):
            t0 = time.perf_counter()
            batch = next(it, None)
            clock.add("data_wait", time.perf_counter() - t0)
            if batch is None:
                if i < last_full:  # the rank still takes part in this micro-batch's collectives
                    with self.strategy.accumulate(i == accum - 1):
                        pass
                continue
            self._open = self.strategy.accumulate(i == accum - 1)
            self._open.__enter__()
            self.at_boundary = i == last_full
            self._sums[_SAMPLES] += sizes[i]
            self._flops.see(batch, sizes[i])
            yield to_device(batch, self.device)
            self._close_micro()

    def _close_micro(self) -> None:
        if self._open is not None:
            ctx, self._open = self._open, None
            ctx.__exit__(None, None, None)

    # -- one optimizer step -------------------------------------------------------------------
    def autocast(self):
        return autocast(self.cfg.train.precision, self.device)

    def backward(self, loss_sum: torch.Tensor, count: float | torch.Tensor, metrics: dict | None = None) -> None:
        """Backward of one micro-batch's ``loss_sum`` over ``count`` units; closes its accumulate context.
        ``metrics``: the step function's sums over those units (reduced at the next metrics line)."""
        if metrics:
            self.metrics.add_units(metrics)
        loss = loss_sum / self._expected_count()
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        self._sums[_COUNT] += float(count)
        self._sums[_LOSS_SUM] += float(loss_sum.detach())
        self._close_micro()

    def _expected_count(self) -> int:
        per_sample = self.data.units_per_sample if self.data is not None else None
        return self.cfg.train.batch_size * (per_sample or 1)

    def end_step(self) -> tuple[float, float, int]:
        """Reduce, scale by the global count, clip, schedule, optimizer step. Collective; every rank, once
        per step. Returns (global loss per unit, gradient norm, this rank's samples)."""
        self._close_micro()
        accum = self.cfg.train.grad_accum
        for i in self._trailing:
            with self.strategy.accumulate(i == accum - 1):
                pass
        self._trailing, self.at_boundary = [], False
        s, clock = self.strategy, self.clock
        clock.start()
        s.finish_gradients()
        totals = torch.tensor(self._sums, dtype=torch.float64)
        self.comm.allreduce(totals, ReduceOp.SUM)
        clock.stop("comm_wait")
        if self.stragglers is not None:
            self.stragglers.end_step(self.step + 1)
        clock.start()
        totals /= self.comm.world_size // self.dp_size  # tp/pp peers of a replica counted the same units
        count, loss_sum, samples = float(totals[_COUNT]), float(totals[_LOSS_SUM]), float(totals[_SAMPLES])
        if count <= 0:
            raise StepOutputError(
                f"step {self.step}: the step function counted no units on any rank (count 0)\n"
                "HINT: return (loss_sum, count) with count the number of samples or tokens in the loss"
            )
        factor = self._expected_count() / count
        grads = s.grad_tensors() if self.scaler is not None or factor != 1.0 else []
        ok = self.scaler.unscale_(grads, self.comm) if self.scaler else True
        if factor != 1.0:
            torch._foreach_mul_([g for g in grads if g.numel()], factor)
        norm = s.clip_grad_norm(self.cfg.optim.grad_clip)
        self.schedule.apply(self.step)
        self._lr = self.schedule.lr()
        for cb in self.callbacks:
            cb.before_optimizer_step(self)
        if ok:  # an fp16 overflow skips the step (the scaler backs off)
            s.optimizer_step()
        self.schedule.advance()
        if self.scaler:
            self.scaler.update(ok)
        s.zero_grad()
        clock.stop("optimizer")
        local_samples = int(self._sums[_SAMPLES])
        self._sums = [0.0, 0.0, 0.0]
        self.step += 1
        w = self._window
        w["loss"] += loss_sum / count
        w["steps"] += 1
        w["samples"] += samples
        w["count"] += count
        return loss_sum / count, norm, local_samples

    def train_step(self) -> tuple[float, float, int]:
        """Run step ``self.step`` with the step function; returns (global loss per unit, grad norm, samples)."""
        if schedules_micro_batches(self.strategy):
            return self._scheduled_step()
        for batch in self.micro_batches():
            with self.autocast():
                res = read_step_output(self.step_fn(self.strategy.model, batch))
            self.backward(res.loss_sum, res.count, res.metrics)
        return self.end_step()

    def _scheduled_step(self) -> tuple[float, float, int]:
        """A strategy that schedules micro-batches itself (pipeline parallel): the step function runs
        through the pipeline's stand-ins for the model (see disttrain.parallel.pipeline.step)."""
        batches = list(self.micro_batches())
        scale = self.scaler.scale_value if self.scaler else 1.0

        def read(out):
            res = read_step_output(out)
            return res.loss_sum, res.count

        with self.autocast():
            loss_sum, count = run_step_fn(
                self.strategy,
                self.step_fn,
                batches,
                self._expected_count(),  # the divisor backward() uses; end_step rescales by the real count
                read,
                is_transformers_model(self.model),
                scale,
            )
        self._sums[_COUNT] += count
        self._sums[_LOSS_SUM] += loss_sum
        return self.end_step()

    def lr(self, step: int) -> float:
        """The first param group's learning rate at step ``step`` (a built-in schedule), else now."""
        if isinstance(self.schedule, BuiltinSchedule):
            return self.schedule.bases[0] * self.schedule.multiplier(step)
        return self.schedule.lr()

    def log(self, metrics: dict, reduce: dict[str, str] | None = None) -> None:
        """Values for the next metrics line, reduced over ranks and the log window (mean by default;
        ``_sum``/``_max``/``_min`` suffixes or ``reduce={name: how}``). Local; any rank, any time."""
        self.metrics.add_values(metrics, reduce)

    # -- callbacks and logging ------------------------------------------------------------------
    def notify_checkpoint(self, step: int, path: str) -> None:
        """Every rank, from the checkpointer after issuing a save: the callbacks' on_checkpoint."""
        for cb in self.callbacks:
            cb.on_checkpoint(self, step, path)

    def start(self) -> None:
        """Every rank, once, before the first step: the callbacks' on_train_start (resume from a
        checkpoint); then the metrics file drops lines a resumed step will write again."""
        if not self._started:
            self._started = True
            self.started_at = self._window["start"] = time.perf_counter()
            resumable = self.step
            for cb in self.callbacks:
                cb.on_train_start(self)
            resumed = self.step != resumable
            self.already_finished = resumed and self.step >= self.cfg.train.steps
            if resumed and not self.already_finished and self.run_dir is not None:
                self.run_dir.resume_metrics(self.step)
            self.clock.reset()

    def after_step(self, norm: float, evaluate: Callable[[], dict] | None = None) -> dict | None:
        """Every rank, after ``end_step``: callbacks (preemption, checkpoints), then a metrics line every
        ``train.log_every`` steps (with an evaluation every ``train.eval_every``, and at the last step),
        then the callbacks' on_step_end (the record is ``last_record``). Returns the record."""
        self.last_record = rec = self._record(norm, evaluate)
        self.schedule.observe(rec)  # ReduceLROnPlateau steps on the line's metric, before any checkpoint
        for cb in self.callbacks:
            cb.on_step_end(self)
        return rec

    def _record(self, norm: float, evaluate: Callable[[], dict] | None) -> dict | None:
        tcfg = self.cfg.train
        last = self.step == tcfg.steps
        logging_now = self.step % tcfg.log_every == 0 or last
        eval_now = bool(tcfg.eval_every and self.step % tcfg.eval_every == 0) or last
        if not (logging_now or eval_now) or not self._window["steps"]:
            return None
        w = self._window
        elapsed = max(time.perf_counter() - w["start"], 1e-9)
        rec = {
            "step": self.step,
            "loss": w["loss"] / w["steps"],
            "grad_norm": norm,
            "lr": self._lr,
            "samples_per_s": w["samples"] / elapsed,
            "time": time.perf_counter() - self.started_at,
        }
        unit = (self.data.unit if self.data is not None else None) or "unit"
        if unit != "sample" and w["count"] != w["samples"]:
            rec[f"{unit}s_per_s"] = w["count"] / elapsed
        replicas = self.comm.world_size // self.dp_size
        rec.update(self.metrics.reduce(self.comm, w["steps"], w["count"], replicas))
        if self.stragglers is not None:
            rec.update(self.stragglers.reduce())
        if self.cfg.log.throughput:
            rows = throughput.window_stats(self.comm, self.clock, self.device, elapsed)
            rec.update(
                throughput.cost_fields(
                    rows,
                    w["steps"],
                    w["samples"],
                    w["count"],
                    unit,
                    self.comm.world_size,
                    tcfg.steps - self.step,
                    self._flops.take(),
                    self._flops.peak,
                )
            )
            self.clock.reset()
        if eval_now and evaluate is not None:
            final = self._evaluate_and_notify(evaluate)
            rec.update(final)
            if last:
                self._final_eval = final
        self.history.append(rec)
        if self.run_dir:
            self.run_dir.log_metrics(rec)
        self._window = {"loss": 0.0, "steps": 0, "samples": 0.0, "count": 0.0, "start": time.perf_counter()}
        return rec

    def _evaluate_and_notify(self, evaluate: Callable[[], dict]) -> dict:
        metrics = evaluate()
        if metrics:
            for cb in self.callbacks:
                cb.on_eval_end(self, metrics)
        return metrics

    # -- evaluation -------------------------------------------------------------------------
    def evaluate(
        self, max_samples: int | None = None, dataset=None, step_fn: StepFn | None = None, collate=None
    ) -> dict[str, float]:
        """Mean loss (and the step function's metrics, per unit) on the eval split; see
        :func:`disttrain.evaluation.evaluate`. Collective; every rank gets the result."""
        return evaluation.evaluate(self, max_samples, dataset, step_fn, collate)

    # -- the loop -------------------------------------------------------------------------
    def fit(self) -> dict:
        """The built-in loop, every rank: resume, train ``train.steps`` steps (or until a stop request),
        evaluate, finish. Blocks; returns the run's summary."""
        try:
            self.start()
            while self.step < self.cfg.train.steps and not self.stop_requested:
                _, norm, _ = self.train_step()
                self.after_step(norm, self.evaluate)
            return self.finish()
        except BaseException as exc:
            self.notify_exception(exc)
            raise

    def notify_exception(self, exc: BaseException) -> None:
        """This rank, when its loop raised: the callbacks' on_exception (their own errors are logged)."""
        for cb in self.callbacks:
            try:
                cb.on_exception(self, exc)
            except Exception as err:
                log.warning("rank %s: %s.on_exception failed: %s", self.comm.env.where, type(cb).__name__, err)

    def finish(self) -> dict:
        """Every rank, after the last step: final evaluation (unless the last step's metrics line did
        it) and the callbacks' on_train_end (final checkpoint). A run that was already finished
        when it started changes nothing: its summary says so (``already_finished``)."""
        self._close_loader()
        if self.already_finished:
            return {
                "experiment": self.cfg.run.name,
                "steps": self.step,
                "world_size": self.comm.world_size,
                "already_finished": True,
            }
        last = self.history[-1] if self.history else {}
        if self._final_eval is None and last.get("step") == self.step and "eval_loss" in last:
            self._final_eval = {k: v for k, v in last.items() if k.startswith("eval_")}  # this step's line has it
        final = self._final_eval if self._final_eval is not None else self._evaluate_and_notify(self.evaluate)
        summary = {
            "experiment": self.cfg.run.name,
            "steps": self.step,
            "world_size": self.comm.world_size,
            "backend": self.comm.backend.name,
            "strategy": self.cfg.parallel.strategy,
            "final_loss": self.history[-1]["loss"] if self.history else None,
            **{f"final_{k}": v for k, v in final.items()},
            "wall_time_s": time.perf_counter() - self.started_at,
            "stopped_early": self.step < self.cfg.train.steps,
        }
        if self.run_dir and final and self._final_eval is None:
            self.run_dir.add_to_step(self.step, final)
        for cb in self.callbacks:
            cb.on_train_end(self, summary)
        return summary
