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
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn

from collectives import Communicator, ReduceOp

from .config import ExperimentConfig
from .data import Data, GlobalBatchSampler, StepLoader, StreamSampler, Task
from .data.dataset import to_device
from .data.loader import eval_split, micro_slices
from .data.stream import build_sampler, is_stream
from .errors import DisttrainError
from .loss import CrossEntropyStep, SplitLogitsStep, StepFn, StepOutputError, read_step_output
from .optim import build_optimizer, build_optimizer_spec, user_optimizer_spec
from .parallel import OptimizerSpec, build_strategy, schedules_micro_batches
from .parallel.pipeline.step import is_transformers_model, run_step_fn
from .precision import autocast, maybe_loss_scaler
from .rundir import RunDir
from .schedule import lr_at

log = logging.getLogger(__name__)

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
        callbacks: list | None = None,
        step_fn: StepFn | None = None,
        optimizer: OptimizerSpec | Callable[[list[dict]], torch.optim.Optimizer] | None = None,
    ):
        self.cfg, self.comm, self.device, self.run_dir = cfg, comm, device, run_dir
        self.task = data if isinstance(data, Task) else None  # a built-in kind: (x, y) tensors
        self.data = data.data() if isinstance(data, Task) else data
        self.step_fn = step_fn or CrossEntropyStep(cfg.loss.ignore_index, cfg.loss.shift_labels)
        if isinstance(self.step_fn, CrossEntropyStep):  # label shifting decided for this model
            self.step_fn = self.step_fn.for_model(model)
        self.model = model.to(device)
        if optimizer is None:
            spec = build_optimizer_spec(cfg.optim, self.model)
        else:
            spec = user_optimizer_spec(optimizer, self.model, cfg.optim.no_decay)
        pcfg = cfg.parallel
        if pcfg.tp.loss_parallel is None:  # auto: logits stay split for steps that read them so (the built-in)
            split = isinstance(self.step_fn, SplitLogitsStep)
            pcfg = pcfg.model_copy(update={"tp": pcfg.tp.model_copy(update={"loss_parallel": split})})
        self.strategy = build_strategy(pcfg, self.model, spec, comm)
        # The user's optimizer keeps its own learning rates: the schedule scales each group's.
        self._base_lrs = None if optimizer is None else [g["lr"] for g in self.strategy.optimizer.param_groups]
        # Model-parallel strategies name this rank's data-parallel replica: its tp/pp peers read the
        # same samples and report the same loss (counted once in the logged metrics).
        self.dp_rank, self.dp_size = self.strategy.dp_rank, self.strategy.dp_size
        self.sampler: GlobalBatchSampler | StreamSampler | None = None
        self._loader: StepLoader | None = None
        self._num_workers = 0
        if self.data is not None:
            self.attach_data(self.data)
        self.step = 0  # optimizer steps completed; also the data position
        self.stop_requested = False  # set from a signal handler (preemption); honoured at a step boundary
        self.history: list[dict] = []
        # Objects with optional on_start(trainer), on_step_end(trainer), on_end(trainer, summary), called in
        # order on every rank (preemption before checkpointing, so a stop request is saved the same step).
        self.callbacks = list(callbacks or [])
        # fp16: dynamic loss scaling over the strategy's (possibly sharded) gradients; None otherwise.
        self.scaler = maybe_loss_scaler(cfg.train.precision)
        self._started = False
        self._open: contextlib.AbstractContextManager | None = None  # the accumulate context of a micro-batch
        self._trailing: list[int] = []  # this step's empty micro-batches after the last non-empty one
        self.at_boundary = False  # the micro-batch handed out last is this step's last non-empty one
        self._sums = [0.0, 0.0, 0.0]  # this rank's count, loss sum and samples in the current step
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
            )
        accum = self.cfg.train.grad_accum
        sizes = [len(mb) for mb in micro_slices(self.sampler.local_batch(self.step), accum)]
        last_full = max((i for i, n in enumerate(sizes) if n), default=-1)
        self._trailing = list(range(last_full + 1, accum))
        for i, batch in enumerate(self._loader.micro_batches(self.step)):
            if batch is None:
                if i < last_full:  # the rank still takes part in this micro-batch's collectives
                    with self.strategy.accumulate(i == accum - 1):
                        pass
                continue
            self._open = self.strategy.accumulate(i == accum - 1)
            self._open.__enter__()
            self.at_boundary = i == last_full
            self._sums[2] += sizes[i]
            yield to_device(batch, self.device)
            self._close_micro()

    def _close_micro(self) -> None:
        if self._open is not None:
            ctx, self._open = self._open, None
            ctx.__exit__(None, None, None)

    # -- one optimizer step -------------------------------------------------------------------
    def autocast(self):
        return autocast(self.cfg.train.precision, self.device)

    def backward(self, loss_sum: torch.Tensor, count: float | torch.Tensor) -> None:
        """Backward of one micro-batch's ``loss_sum`` over ``count`` units; closes its accumulate context."""
        loss = loss_sum / self._expected_count()
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        self._sums[0] += float(count)
        self._sums[1] += float(loss_sum.detach())
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
        s = self.strategy
        s.finish_gradients()
        totals = torch.tensor(self._sums, dtype=torch.float64)
        self.comm.allreduce(totals, ReduceOp.SUM)
        totals /= self.comm.world_size // self.dp_size  # tp/pp peers of a replica counted the same units
        count, loss_sum, samples = float(totals[0]), float(totals[1]), float(totals[2])
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
        self._apply_lr()
        if ok:  # an fp16 overflow skips the step (the scaler backs off)
            s.optimizer_step()
        if self.scaler:
            self.scaler.update(ok)
        s.zero_grad()
        local_samples = int(self._sums[2])
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
            self.backward(res.loss_sum, res.count)
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
        self._sums[0] += count
        self._sums[1] += loss_sum
        return self.end_step()

    def lr(self, step: int) -> float:
        """The learning rate of step ``step`` (the first param group's, for a user's optimizer)."""
        s, total = self.cfg.schedule, self.cfg.train.steps
        if self._base_lrs is not None:
            return self._base_lrs[0] * lr_at(step, 1.0, total, s.kind, s.warmup_steps, s.min_lr_ratio)
        return lr_at(step, self.cfg.optim.lr, total, s.kind, s.warmup_steps, s.min_lr_ratio)

    def _apply_lr(self) -> None:
        if self._base_lrs is None:
            self.strategy.set_lr(self.lr(self.step))
            return
        s = self.cfg.schedule
        mult = lr_at(self.step, 1.0, self.cfg.train.steps, s.kind, s.warmup_steps, s.min_lr_ratio)
        for g, base in zip(self.strategy.optimizer.param_groups, self._base_lrs):
            g["lr"] = base * mult

    # -- callbacks and logging ------------------------------------------------------------------
    def _call(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if fn is not None:
                fn(self, *args)

    def start(self) -> None:
        """Every rank, once, before the first step: the callbacks' on_start (resume from a checkpoint)."""
        if not self._started:
            self._started = True
            self.started_at = self._window["start"] = time.perf_counter()
            self._call("on_start")

    def after_step(self, norm: float, evaluate: Callable[[], dict] | None = None) -> dict | None:
        """Every rank, after ``end_step``: callbacks (preemption, checkpoints), then a metrics line every
        ``train.log_every`` steps (with an evaluation every ``train.eval_every``). Returns the record."""
        self._call("on_step_end")
        tcfg = self.cfg.train
        logging_now = self.step % tcfg.log_every == 0 or self.step == tcfg.steps
        eval_now = bool(tcfg.eval_every and self.step % tcfg.eval_every == 0 and self.step < tcfg.steps)
        if not (logging_now or eval_now) or not self._window["steps"]:
            return None
        w = self._window
        elapsed = max(time.perf_counter() - w["start"], 1e-9)
        rec = {
            "step": self.step,
            "loss": w["loss"] / w["steps"],
            "grad_norm": norm,
            "lr": self.lr(self.step - 1),
            "samples_per_s": w["samples"] / elapsed,
            "time": time.perf_counter() - self.started_at,
        }
        unit = (self.data.unit if self.data is not None else None) or "unit"
        if unit != "sample" and w["count"] != w["samples"]:
            rec[f"{unit}s_per_s"] = w["count"] / elapsed
        if eval_now and evaluate is not None:
            rec.update(evaluate())
        self.history.append(rec)
        if self.run_dir:
            self.run_dir.log_metrics(rec)
        if self.comm.rank == 0:
            self._print_progress(rec, unit)
        self._window = {"loss": 0.0, "steps": 0, "samples": 0.0, "count": 0.0, "start": time.perf_counter()}
        return rec

    # -- evaluation -------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(
        self, max_samples: int | None = None, dataset=None, step_fn: StepFn | None = None, collate=None
    ) -> dict[str, float]:
        """Mean loss (and the step function's metrics, per unit) on up to ``max_samples`` (default
        ``train.eval_samples``) evenly spaced
        samples of the eval split. Collective; every rank gets the result ({} without an eval split)."""
        dataset = dataset if dataset is not None else (self.data.eval if self.data is not None else None)
        if dataset is None or (not is_stream(dataset) and len(dataset) == 0):
            return {}
        collate = collate if collate is not None else self.data.collate if self.data is not None else None
        step_fn = step_fn or self.step_fn
        per_rank = max(1, self.cfg.train.batch_size // self.dp_size)
        # Every rank takes the same number of samples, so the same number of forward passes: sharded
        # strategies (ZeRO-3, tp, pp) run collectives inside forward.
        batches, mine = eval_split(
            dataset,
            max_samples or self.cfg.train.eval_samples,
            self.dp_rank,
            self.dp_size,
            per_rank,
            collate,
            self._num_workers,
        )
        loss_sum, count, metrics = 0.0, 0.0, {}
        model = self.strategy.model
        was_training = model.training
        model.eval()
        try:
            for batch in batches:
                with self.autocast():
                    res = read_step_output(step_fn(model, to_device(batch, self.device)))
                loss_sum += float(res.loss_sum)
                count += res.count
                for k, v in res.metrics.items():
                    metrics[k] = metrics.get(k, 0.0) + v
        finally:
            model.train(was_training)
        # Metric names are the same on every rank that evaluated something; agree on whether all did.
        empty = torch.tensor([0.0 if mine else 1.0])
        self.comm.allreduce(empty, ReduceOp.SUM)
        names = sorted(metrics) if float(empty) == 0 else []
        totals = torch.tensor([loss_sum, count, *(metrics[k] for k in names)], dtype=torch.float64)
        self.comm.allreduce(totals, ReduceOp.SUM)
        if float(totals[1]) <= 0:
            return {}
        out = {"eval_loss": float(totals[0] / totals[1])}
        out.update({f"eval_{k}": float(totals[2 + i] / totals[1]) for i, k in enumerate(names)})
        return out

    # -- the loop -------------------------------------------------------------------------
    def fit(self) -> dict:
        """The built-in loop, every rank: resume, train ``train.steps`` steps (or until a stop request),
        evaluate, finish. Blocks; returns the run's summary."""
        self.start()
        while self.step < self.cfg.train.steps and not self.stop_requested:
            _, norm, _ = self.train_step()
            self.after_step(norm, self.evaluate)
        return self.finish()

    def finish(self) -> dict:
        """Every rank, after the last step: final evaluation and the callbacks' on_end (final checkpoint)."""
        self._close_loader()
        final = self.evaluate()
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
        if self.run_dir and final:
            self.run_dir.log_metrics({"step": self.step, **final})
        self._call("on_end", summary)
        return summary

    def _print_progress(self, rec: dict, unit: str) -> None:
        total = self.cfg.train.steps
        key = f"{unit}s_per_s"
        speed = f"{rec[key]:,.0f} {unit}s/s" if key in rec else f"{rec['samples_per_s']:,.0f} samples/s"
        if key == "tokens_per_s":
            speed = f"{rec[key]:,.0f} tok/s"
        extra = "".join(f" | {k} {v:.4f}" for k, v in rec.items() if k.startswith("eval_"))
        bar_w = 20
        filled = int(bar_w * min(rec["step"], total) / total)
        print(
            f"[{'#' * filled}{'.' * (bar_w - filled)}] step {rec['step']}/{total} | loss {rec['loss']:.4f} | "
            f"grad {rec['grad_norm']:.3f} | lr {rec['lr']:.2e} | {speed}{extra}",
            flush=True,
        )
