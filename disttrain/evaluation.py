"""Evaluation of the run's model on its eval split: the mean loss and the step function's metrics
per unit, over every rank. ``trainer`` is a :class:`disttrain.trainer.Trainer` (not imported: the
trainer imports this module).

Called by ``Trainer.evaluate`` (the built-in loop's metrics lines and end of run, and the Python
API's ``run.evaluate``). Every rank takes the same number of samples, so the same number of
forward passes: sharded strategies (ZeRO-3, tp, pp) run collectives inside forward.
"""

from __future__ import annotations

import torch

from collectives import ReduceOp

from .data.dataset import to_device
from .data.loader import eval_split
from .data.stream import is_stream
from .loss import StepFn, read_step_output
from .observe.metrics import MetricWindow


@torch.no_grad()
def evaluate(
    trainer, max_samples: int | None = None, dataset=None, step_fn: StepFn | None = None, collate=None
) -> dict[str, float]:
    """Mean loss (and the step function's metrics, per unit) on up to ``max_samples`` (default
    ``train.eval_samples``) evenly spaced samples of the eval split (default the trainer's data).
    Collective: every rank calls it, and every rank gets the result ({} without an eval split)."""
    data = trainer.data
    dataset = dataset if dataset is not None else (data.eval if data is not None else None)
    if dataset is None or (not is_stream(dataset) and len(dataset) == 0):
        return {}
    collate = collate if collate is not None else data.collate if data is not None else None
    step_fn = step_fn or trainer.step_fn
    cfg = trainer.cfg
    per_rank = max(1, cfg.train.batch_size // trainer.dp_size)
    batches, _ = eval_split(
        dataset,
        max_samples or cfg.train.eval_samples,
        trainer.dp_rank,
        trainer.dp_size,
        per_rank,
        collate,
        trainer._num_workers,
        cfg.data.worker_start,
    )
    loss_sum, count, metrics = 0.0, 0.0, MetricWindow()
    model = trainer.strategy.model
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            with trainer.autocast():
                res = read_step_output(step_fn(model, to_device(batch, trainer.device)))
            loss_sum += float(res.loss_sum)
            count += res.count
            metrics.add_units(res.metrics)
    finally:
        model.train(was_training)
    totals = torch.tensor([loss_sum, count], dtype=torch.float64)
    trainer.comm.allreduce(totals, ReduceOp.SUM)
    reduced = metrics.reduce(trainer.comm, 1, float(totals[1]))  # every rank, even one that read nothing
    if float(totals[1]) <= 0:
        return {}
    out = {"eval_loss": float(totals[0] / totals[1])}
    out.update({f"eval_{k}": v for k, v in reduced.items()})
    return out
