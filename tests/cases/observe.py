"""Rank functions for what a job shows: callbacks, the user's metrics, trackers, schedulers and the
metrics file, through disttrain.fit and a user's own loop on the ragged sequences of user_api."""

from __future__ import annotations

import json
import os

import torch

import disttrain
from disttrain.loss import cross_entropy_step
from tests.cases.user_api import Ragged, Tiny, pad

CALLS = {"n": 0}


def metric_step(model, batch):
    """The built-in step plus metrics: ``all`` (every unit: 1.0 per unit), ``rank_max`` (the rank,
    reduced by max), ``calls_max`` (calls so far on this rank: only grows)."""
    loss_sum, count, _ = cross_entropy_step(model, batch)
    CALLS["n"] += 1
    rank = int(os.environ.get("RANK", "0"))
    return loss_sum, count, {"all": count, "rank_max": rank, "calls_max": CALLS["n"]}


class Recorder(disttrain.Callback):
    """Writes the hooks it sees, in order, and the learning rate of each step, to ``path`` (rank 0)."""

    def __init__(self, path: str, fail_at: int | None = None):
        self.path, self.fail_at = path, fail_at
        self.calls: list[str] = []
        self.lrs: list[float] = []

    def _dump(self, trainer) -> None:
        if trainer.comm.rank == 0:
            with open(self.path, "w") as f:
                json.dump({"calls": self.calls, "lrs": self.lrs}, f)

    def on_train_start(self, trainer):
        self.calls.append("on_train_start")

    def before_optimizer_step(self, trainer):
        self.calls.append("before_optimizer_step")
        self.lrs.append(trainer.strategy.optimizer.param_groups[0]["lr"])

    def on_eval_end(self, trainer, metrics):
        self.calls.append("on_eval_end")

    def on_step_end(self, trainer):
        self.calls.append("on_step_end")
        if self.fail_at is not None and trainer.step == self.fail_at:
            raise RuntimeError(f"injected failure after step {trainer.step}")

    def on_checkpoint(self, trainer, step, path):
        self.calls.append(f"on_checkpoint:{step}:{os.path.basename(path)}")

    def on_exception(self, trainer, exc):
        self.calls.append(f"on_exception:{type(exc).__name__}")
        self._dump(trainer)

    def on_train_end(self, trainer, summary):
        self.calls.append("on_train_end")
        summary["history"] = trainer.history
        self._dump(trainer)


def fit(config: str, overrides: list[str], record: str, fail_at: int | None = None) -> dict:
    torch.manual_seed(0)
    summary = disttrain.fit(
        model=Tiny(),
        data=(Ragged(), Ragged(12)),
        step=metric_step,
        config=config,
        argv=overrides,
        collate_fn=pad,
        callbacks=[Recorder(record, fail_at)],
    )
    return {"summary": summary}


def own_loop(config: str, overrides: list[str], step_lr: bool = False, plateau: bool = False) -> dict:
    """run.log values every step plus the step function's metrics; with ``step_lr`` a StepLR(2, 0.5)
    the run steps and checkpoints (``plateau``: a ReduceLROnPlateau(mode=max, patience=1, factor=0.5)).
    Returns the learning rate after each step."""
    run = disttrain.init(config, overrides)
    sched = (lambda opt: torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)) if step_lr else None
    if plateau:
        sched = lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", patience=1, factor=0.5)  # noqa: E731
    model, opt = run.setup(Tiny(), lambda groups: torch.optim.AdamW(groups, lr=0.01), scheduler=sched)
    lrs = []
    for batch in run.batches(Ragged(), collate_fn=pad):
        run.backward(*metric_step(model, batch))
        r = run.rank
        run.log(
            {"r": r, "r_max": r, "r_min": r, "one_sum": 1.0, "declared": r, "at": run.global_step},
            reduce={"declared": "max"},
        )
        if r == 0 and not step_lr and not plateau:  # a name only rank 0 has: the ranks agree on the names first
            run.log({"only0": 7.0})
        if run.step():
            lrs.append(opt.param_groups[0]["lr"])
    history = run.trainer.history
    run.finish()
    return {"lrs": lrs, "history": history}


def slow_step(model, batch):
    """``metric_step``, but rank 1 first sleeps 50 ms (a straggler in every step)."""
    import time

    if int(os.environ.get("RANK", "0")) == 1:
        time.sleep(0.05)
    return metric_step(model, batch)


def fit_slow(config: str, overrides: list[str]) -> dict:
    torch.manual_seed(0)
    summary = disttrain.fit(
        model=Tiny(), data=(Ragged(), None), step=slow_step, config=config, argv=overrides, collate_fn=pad
    )
    return {"summary": summary}


def tiny_llama(seed: int = 0):
    """A two-layer Llama with grouped-query attention (4 heads, 2 key/value heads) and an untied head."""
    import transformers

    from tests.cases.user_api import VOCAB

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=8, tie_word_embeddings=False,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


def fit_hf(config: str, overrides: list[str], kind: str) -> dict:
    """The built-in step through ``disttrain.fit`` on a tiny transformers causal LM (gpt2 or llama)."""
    from tests.cases.user_api import Tokens, tiny_gpt2

    model = tiny_gpt2() if kind == "gpt2" else tiny_llama()
    return {"summary": disttrain.fit(model=model, data=(Tokens(), None), config=config, argv=overrides)}
