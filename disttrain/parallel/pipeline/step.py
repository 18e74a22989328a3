"""A user's step function ``(model, batch) -> (loss_sum, count[, metrics])`` under pipeline parallel.

A step function runs the whole model; a pipeline runs it a stage at a time. The step function
is therefore called twice per micro-batch, each time with a stand-in for the model:

1. on the first stage, a *recorder*: the step function calls ``model(input_ids)`` (or
   ``model(input_ids=...)``, or ``model(x)``), the recorder keeps that one input and stops the
   call; it is what the first stage is fed;
2. on the last stage, the pipeline's *output*: the stand-in returns the last stage's output
   (as a transformers ``CausalLMOutput`` with ``logits`` when the model is a transformers model),
   and the step function computes its loss and count from it as it always does.

Loss sums and counts exist on the last stage only; they are broadcast over the pp group so
every rank reports the same numbers. Gradients are of ``loss_sum / divisor`` (the trainer's expected
global count; it rescales by ``expected / count`` once the real global count is known).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch

from ..adapters import adapted_base
from ..mesh import MeshError


class _Recorded(Exception):
    """Stops the step function once the recorder has its input."""


def first_stage_input(step_fn: Callable, batch: Any):
    """The one input the step function gives the model for ``batch`` (locally, no communication)."""
    seen: dict[str, Any] = {}

    def recorder(*args, **kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        raise _Recorded

    try:
        step_fn(recorder, batch)
    except _Recorded:
        pass
    if not seen:
        raise MeshError("pipeline parallel: the step function never called the model")
    args, kwargs = seen["args"], {k: v for k, v in seen["kwargs"].items() if v is not None}
    if len(args) == 1 and not kwargs:
        return args[0]
    if not args and len(kwargs) == 1:
        return next(iter(kwargs.values()))
    raise MeshError(
        f"pipeline parallel: the step function calls the model with {len(args)} positional and keyword "
        f"arguments {sorted(kwargs)}; a pipeline's first stage takes one input"
        "\nHINT: call model(input_ids) in the step function (masks and labels stay in the step function)"
    )


def as_model_output(model_is_transformers: bool, out: torch.Tensor):
    """What the model itself would return: a transformers model's output carries ``logits``."""
    if model_is_transformers:
        from transformers.modeling_outputs import CausalLMOutput

        return CausalLMOutput(logits=out)
    return out


def is_transformers_model(model) -> bool:
    """A transformers model, or one under peft adapters (its output carries ``logits`` too)."""
    mod = sys.modules.get("transformers")
    return mod is not None and isinstance(adapted_base(model)[0], mod.PreTrainedModel)


def run_step_fn(
    strategy,
    step_fn: Callable,
    batches: list,
    divisor: int,
    read_output: Callable[[Any], tuple[torch.Tensor, float]],
    transformers_model: bool = False,
    loss_scale: float = 1.0,
) -> tuple[float, float]:
    """Every rank of the world: forward and backward ``batches`` (this replica's micro-batches) through
    the pipeline with ``step_fn``; ``read_output(step_fn result) -> (loss_sum, count)``. Returns the
    replica's (loss_sum, count), the same on every pp stage."""
    micro = [(first_stage_input(step_fn, b), b) for b in strategy.split_micro_batches(batches)]
    sums = [0.0, 0.0]

    def loss_fn(out, batch):
        loss_sum, count = read_output(step_fn(lambda *a, **k: as_model_output(transformers_model, out), batch))
        sums[0] += float(loss_sum.detach())
        sums[1] += float(count)
        return loss_sum / divisor

    strategy.forward_backward_micro(micro, loss_fn, loss_scale)
    return tuple(strategy.last_stage_broadcast(sums))
