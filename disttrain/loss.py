"""Step functions: one micro-batch's forward and loss, ``(model, batch) -> (loss_sum, count[, metrics])``.

``loss_sum`` is the loss *summed* over ``count`` units (samples, or tokens that are not
padding); ``metrics`` are sums too (e.g. correct predictions). The trainer adds counts over
every rank and micro-batch and divides once, so the gradient is the global-batch mean
whatever the layout. The user's own step comes from ``loss.target``; the built-in one is
cross-entropy over ``(input, target)`` pairs or ``{..., "labels": target}`` dicts, reading the
logits of tensor, tuple, dict and transformers ``ModelOutput`` outputs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn as nn

from .parallel.tensor.vocab import cross_entropy as vocab_cross_entropy
from .targets import UserCodeError, import_target

StepFn = Callable[[nn.Module, Any], tuple]


class StepOutputError(UserCodeError):
    """A step function or model returned something the trainer cannot read."""


@dataclasses.dataclass
class StepResult:
    loss_sum: torch.Tensor
    count: float
    metrics: dict[str, float]


def read_step_output(out: Any) -> StepResult:
    """``(loss_sum, count)`` or ``(loss_sum, count, metrics)`` -> StepResult."""
    if not isinstance(out, (tuple, list)) or len(out) not in (2, 3) or not isinstance(out[0], torch.Tensor):
        raise StepOutputError(
            f"the step function returned {type(out).__name__}, expected (loss_sum, count) or "
            "(loss_sum, count, metrics) with loss_sum a tensor summed over count units"
        )
    metrics = {k: float(v) for k, v in (out[2] if len(out) == 3 and out[2] else {}).items()}
    return StepResult(out[0], float(out[1]), metrics)


HINT = (
    "HINT: set loss.target to a step function (model, batch) -> (loss_sum, count) that runs your "
    "model and returns its loss summed over count units"
)


def read_logits(output: Any) -> torch.Tensor:
    """The logits of a model output: a tensor, the first item of a tuple, or ``logits`` of a dict or
    transformers ModelOutput. Anything else is an error that names the type and points to loss.target."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):  # transformers' ModelOutput is an OrderedDict
        if isinstance(output.get("logits"), torch.Tensor):
            return output["logits"]
        raise StepOutputError(
            f"the built-in cross-entropy step cannot read a model output of type {type(output).__qualname__} "
            f"with keys {sorted(output)} (it needs 'logits')\n{HINT}"
        )
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise StepOutputError(
        f"the built-in cross-entropy step cannot read a model output of type {type(output).__qualname__}\n{HINT}"
    )


def cross_entropy_step(model: nn.Module, batch: Any, ignore_index: int = -100):
    """The built-in step: cross-entropy summed over every target that is not ``ignore_index``;
    a classifier (one prediction per sample) also reports ``accuracy``."""
    if isinstance(batch, Mapping) and "labels" in batch:
        target = batch["labels"]
        output = model(**{k: v for k, v in batch.items() if k != "labels"})
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, target = batch
        output = model(inputs)
    else:
        raise StepOutputError(
            f"the built-in cross-entropy step takes (input, target) pairs or dicts with 'labels'; got a batch "
            f"of type {type(batch).__qualname__}\n{HINT}"
        )
    logits = read_logits(output)
    flat = target.reshape(-1)
    if logits.shape[:-1].numel() != flat.numel():
        raise StepOutputError(
            f"the built-in cross-entropy step got logits of shape {tuple(logits.shape)} for targets of shape "
            f"{tuple(target.shape)} (one row of logits per target expected; causal LMs: shift the labels in "
            f"the dataset)\n{HINT}"
        )
    # Logits split by vocabulary across tp (a vocab-parallel head) are scored without gathering them.
    loss_sum = vocab_cross_entropy(logits, flat, reduction="sum", ignore_index=ignore_index)
    valid = flat != ignore_index
    metrics = {}
    if logits.dim() == 2:
        metrics["accuracy"] = ((logits.argmax(-1) == flat) & valid).sum()
    return loss_sum, valid.sum(), metrics


def build_step(cfg, import_path: list[str]) -> StepFn:
    """The step function of the ``loss`` section: ``loss.target`` with ``loss.kwargs``, or the built-in one."""
    if cfg.target:
        fn = import_target(cfg.target, import_path)
        return functools.partial(fn, **cfg.kwargs) if cfg.kwargs else fn
    return functools.partial(cross_entropy_step, ignore_index=cfg.ignore_index)
