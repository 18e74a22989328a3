"""The ``schedule:`` section: the learning-rate schedule."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .section import Section


class ScheduleConfig(Section):
    kind: Literal["constant", "cosine"] = Field("cosine", description="Learning-rate schedule after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps from 0 to the peak lr.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final lr of the cosine as a fraction of the peak.")
