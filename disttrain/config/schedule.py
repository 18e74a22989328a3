"""The ``schedule:`` section: the learning-rate schedule."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from .section import Section


class ScheduleConfig(Section):
    kind: Literal["constant", "cosine", "torch", "none"] = Field(
        "cosine",
        description="Learning-rate schedule after warmup: constant or cosine (built in), torch (the "
        "torch.optim.lr_scheduler class `name`; set implicitly by `name`), or none (the trainer never "
        "touches the learning rates: the user's own scheduler is in charge).",
    )
    name: str | None = Field(
        None,
        description="A torch.optim.lr_scheduler class (StepLR, OneCycleLR, CosineAnnealingLR, ...), stepped "
        "once per optimizer step with `kwargs`; warmup_steps > 0 puts a LinearLR warmup before it.",
    )
    kwargs: dict[str, Any] = Field({}, description="Keyword arguments of the scheduler class `name`.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps from 0 to the peak lr.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final lr of the cosine as a fraction of the peak.")

    @model_validator(mode="after")
    def _known_scheduler(self) -> ScheduleConfig:
        if self.name is not None and self.kind in ("constant", "cosine"):
            object.__setattr__(self, "kind", "torch")
        if self.kind == "torch":
            from ..schedule import check_scheduler  # torch is imported only when a scheduler is named

            check_scheduler(self.name)
        return self
