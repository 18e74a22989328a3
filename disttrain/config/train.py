"""The ``train:`` section: loop length, batch and precision."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .section import Section


class TrainConfig(Section):
    steps: int = Field(300, ge=1, description="Optimizer steps.")
    batch_size: int = Field(64, ge=1, description="Global batch (samples or sequences) per optimizer step.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step (no communication until the last).")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Autocast dtype; master weights stay fp32.")
    log_every: int = Field(10, ge=1, description="Steps between metric lines.")
    eval_every: int = Field(0, ge=0, description="Steps between evaluations (0: only at the end).")
    eval_samples: int = Field(
        2048, ge=1, description="Samples of the eval split each evaluation reads (evenly spaced)."
    )
