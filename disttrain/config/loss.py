"""The ``loss:`` section: the step function (forward and loss)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from .section import Section, TargetStr


class LossConfig(Section):
    target: TargetStr | None = Field(
        None,
        description="'package.module:step': a function (model, batch) -> (loss_sum, count) or "
        "(loss_sum, count, metrics); it runs the forward and returns the loss summed over `count` units "
        "(samples or tokens). Default: the built-in cross-entropy step over (input, target) or "
        "{..., 'labels'} batches.",
    )
    kwargs: dict[str, Any] = Field({}, description="Extra keyword arguments of the step function.")
    ignore_index: int = Field(-100, description="Built-in step: target value that is not counted (padding).")
    shift_labels: bool | None = Field(
        None,
        description="Built-in step: the 'labels' of dict batches are the input tokens and position t is scored "
        "against label t+1 (transformers' causal-LM convention). Default: on for transformers causal LMs "
        "(*ForCausalLM, *LMHeadModel, also under peft), off otherwise; (input, target) pairs are never shifted.",
    )
