"""The training loop: one global batch per step, split across ranks and micro-batches.

Every rank calls ``Trainer.fit()``; it blocks until the last step, then evaluates.
Losses are summed per sample and divided by the *global* sample count, so the reduced
gradient equals one process's gradient on the same global batch, whatever the world
size or micro-batching (the equivalence tests rely on this).
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch
import torch.nn as nn

from collectives import Communicator, ReduceOp

from .config import ExperimentConfig
from .data import GlobalBatchSampler, Task
from .parallel import build_strategy
from .precision import maybe_loss_scaler
from .rundir import RunDir
from .schedule import lr_at

log = logging.getLogger(__name__)

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def build_optimizer(cfg, params) -> torch.optim.Optimizer:
    """The optimizer named by the ``optim`` config section, over ``params``."""
    params = list(params)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


class Trainer:
    def __init__(
        self,
        cfg: ExperimentConfig,
        comm: Communicator,
        model: nn.Module,
        task: Task,
        run_dir: RunDir | None = None,
        device: str = "cpu",
        callbacks: list | None = None,
    ):
        self.cfg, self.comm, self.task, self.device = cfg, comm, task, device
        self.run_dir = run_dir
        self.model = model.to(device)
        self.strategy = build_strategy(cfg.parallel, self.model, lambda ps: build_optimizer(cfg.optim, ps), comm)
        # Model-parallel strategies name this rank's data-parallel replica: its tp/pp peers read the
        # same samples and report the same loss (counted once in the logged metrics).
        self.dp_rank = getattr(self.strategy, "dp_rank", comm.rank)
        self.dp_size = getattr(self.strategy, "dp_size", comm.world_size)
        self.sampler = GlobalBatchSampler(
            task.num_train, cfg.train.batch_size, cfg.run.seed, self.dp_rank, self.dp_size
        )
        self.step = 0  # optimizer steps completed; also the data position
        self.stop_requested = False  # set from a signal handler (preemption); honoured at a step boundary
        self.history: list[dict] = []
        # Objects with optional on_start(trainer), on_step_end(trainer), on_end(trainer, summary), called in
        # order on every rank (preemption before checkpointing, so a stop request is saved the same step).
        self.callbacks = list(callbacks or [])
        # fp16: dynamic loss scaling over the strategy's (possibly sharded) gradients; None otherwise.
        self.scaler = maybe_loss_scaler(cfg.train.precision) if hasattr(self.strategy, "grad_tensors") else None

    def _call(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if fn is not None:
                fn(self, *args)

    # -- one optimizer step ---------------------------------------------------------------
    def _autocast(self):
        dtype = _AUTOCAST.get(self.cfg.train.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.split(":")[0], dtype=dtype)

    def train_step(self) -> tuple[float, float, int]:
        """Run step ``self.step``; returns (this rank's loss sum / global count, grad norm, samples)."""
        tcfg = self.cfg.train
        idx = self.sampler.local_batch(self.step)
        global_count = None
        local_loss = 0.0
        micro = list(torch.tensor_split(idx, tcfg.grad_accum)) if len(idx) else [idx] * tcfg.grad_accum
        fb = getattr(self.strategy, "forward_backward", None)
        if fb is not None:  # the strategy schedules micro-batches itself (pipeline parallel)
            batches = [tuple(t.to(self.device) for t in self.task.batch(mb)) for mb in micro]
            global_count = self.cfg.train.batch_size * self.task.units_per_sample
            with self._autocast():
                scale = self.scaler.scale_value if self.scaler else 1.0
                local_loss = fb(batches, lambda logits, y: self.task.loss_sum(logits, y) / global_count, scale)
            micro = []
        for i, mb in enumerate(micro):
            last = i == len(micro) - 1
            with self.strategy.accumulate(last):
                if len(mb) == 0:
                    continue  # nothing here, but the strategy still takes part in the collectives
                x, y = self.task.batch(mb)
                x, y = x.to(self.device), y.to(self.device)
                if global_count is None:
                    global_count = self.cfg.train.batch_size * self.task.count(y[:1])
                with self._autocast():
                    logits = self.strategy.model(x)
                loss = self.task.loss_sum(logits, y) / global_count
                (self.scaler.scale(loss) if self.scaler else loss).backward()
                local_loss += float(loss.detach())
        self.strategy.finish_gradients()
        ok = self.scaler.unscale_(self.strategy.grad_tensors(), self.comm) if self.scaler else True
        norm = self.strategy.clip_grad_norm(self.cfg.optim.grad_clip)
        self.strategy.set_lr(self.lr(self.step))
        if ok:  # an fp16 overflow skips the step (the scaler backs off)
            self.strategy.optimizer_step()
        if self.scaler:
            self.scaler.update(ok)
        self.strategy.zero_grad()
        self.step += 1
        return local_loss, norm, len(idx)

    def lr(self, step: int) -> float:
        s = self.cfg.schedule
        return lr_at(step, self.cfg.optim.lr, self.cfg.train.steps, s.kind, s.warmup_steps, s.min_lr_ratio)

    # -- evaluation -------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, max_samples: int = 2048) -> dict:
        """Loss (and accuracy for classifiers) on the held-out split. Collective; every rank gets the result."""
        n = min(self.task.num_eval, max_samples)
        idx = torch.linspace(0, self.task.num_eval - 1, n).long()
        mine = idx[self.sampler.local_slice(n)]
        totals = torch.zeros(3, dtype=torch.float64)
        self.strategy.model.eval()
        for chunk in torch.split(mine, 256):
            x, y = self.task.batch(chunk, "eval")
            x, y = x.to(self.device), y.to(self.device)
            with self._autocast():
                logits = self.strategy.model(x)
            totals[0] += float(self.task.loss_sum(logits, y))
            totals[1] += float((logits.argmax(-1) == y).sum())
            totals[2] += y.numel()
        self.strategy.model.train()
        self.comm.allreduce(totals, ReduceOp.SUM)
        out = {"eval_loss": float(totals[0] / totals[2])}
        if not self.task.is_lm:
            out["eval_accuracy"] = float(totals[1] / totals[2])
        return out

    # -- the loop -------------------------------------------------------------------------
    def fit(self) -> dict:
        tcfg = self.cfg.train
        rank0 = self.comm.rank == 0
        start = time.perf_counter()
        window_loss = torch.zeros(2, dtype=torch.float64)  # loss sum over the window, steps
        window_start, window_samples, last_norm = time.perf_counter(), 0, 0.0
        self._call("on_start")
        while self.step < tcfg.steps and not self.stop_requested:
            loss, last_norm, samples = self.train_step()
            window_loss += torch.tensor([loss, 1.0], dtype=torch.float64)
            window_samples += samples
            self._call("on_step_end")
            logging_now = self.step % tcfg.log_every == 0 or self.step == tcfg.steps
            eval_now = tcfg.eval_every and self.step % tcfg.eval_every == 0 and self.step < tcfg.steps
            if logging_now or eval_now:
                stats = torch.cat([window_loss, torch.tensor([float(window_samples)], dtype=torch.float64)])
                self.comm.allreduce(stats, ReduceOp.SUM)
                stats /= self.comm.world_size // self.dp_size  # replicas of one dp rank's loss and samples
                elapsed = time.perf_counter() - window_start
                rec = {
                    "step": self.step,
                    "loss": float(stats[0] / window_loss[1]),
                    "grad_norm": last_norm,
                    "lr": self.lr(self.step - 1),
                    "samples_per_s": float(stats[2]) / elapsed,
                    "time": time.perf_counter() - start,
                }
                if self.task.is_lm:
                    rec["tokens_per_s"] = rec["samples_per_s"] * self.task.units_per_sample
                if eval_now:
                    rec.update(self.evaluate())
                self.history.append(rec)
                if self.run_dir:
                    self.run_dir.log_metrics(rec)
                if rank0:
                    self._print_progress(rec)
                window_loss.zero_()
                window_start, window_samples = time.perf_counter(), 0
        final = self.evaluate()
        wall = time.perf_counter() - start
        summary = {
            "experiment": self.cfg.run.name,
            "steps": self.step,
            "world_size": self.comm.world_size,
            "backend": self.comm.backend.name,
            "strategy": self.cfg.parallel.strategy,
            "final_loss": self.history[-1]["loss"] if self.history else None,
            **{f"final_{k}": v for k, v in final.items()},
            "wall_time_s": wall,
            "stopped_early": self.step < tcfg.steps,
        }
        if self.run_dir:
            self.run_dir.log_metrics({"step": self.step, **final})
        self._call("on_end", summary)
        return summary

    def _print_progress(self, rec: dict) -> None:
        total = self.cfg.train.steps
        speed = (
            f"{rec['tokens_per_s']:,.0f} tok/s" if "tokens_per_s" in rec else f"{rec['samples_per_s']:,.0f} samples/s"
        )
        extra = "".join(f" | {k} {v:.4f}" for k, v in rec.items() if k.startswith("eval_"))
        bar_w = 20
        filled = int(bar_w * rec["step"] / total)
        print(
            f"[{'#' * filled}{'.' * (bar_w - filled)}] step {rec['step']}/{total} | loss {rec['loss']:.4f} | "
            f"grad {rec['grad_norm']:.3f} | lr {rec['lr']:.2e} | {speed}{extra}",
            flush=True,
        )
