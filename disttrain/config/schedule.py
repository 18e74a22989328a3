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
    monitor: str = Field(
        "eval_loss",
        description="The metric ReduceLROnPlateau steps on: a name on the metrics line (eval_loss, loss, "
        "eval_accuracy, a metric of yours); it steps at every line that has it (log_every, eval_every). Set "
        "`kwargs: {mode: max}` for a metric that should grow.",
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps from 0 to the peak lr.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final lr of the cosine as a fraction of the peak.")

    @model_validator(mode="after")
    def _known_scheduler(self) -> ScheduleConfig:
        if self.name is not None and self.kind in ("constant", "cosine"):
            object.__setattr__(self, "kind", "torch")
        if self.kind == "torch":
            check_scheduler(self.name)  # torch is imported only when a scheduler is named
            if self.warmup_steps and (self.name or "").lower() == "reducelronplateau":
                raise ValueError(
                    "warmup_steps does not compose with ReduceLROnPlateau (SequentialLR steps it without its "
                    "metric); HINT: set warmup_steps: 0, or warm up with another scheduler"
                )
        return self


def scheduler_class(name: str | None) -> type:
    """The ``torch.optim.lr_scheduler`` class called ``name`` (case-insensitive)."""
    from torch.optim import lr_scheduler

    known = {
        k.lower(): v
        for k, v in vars(lr_scheduler).items()
        if isinstance(v, type) and issubclass(v, lr_scheduler.LRScheduler) and v is not lr_scheduler.LRScheduler
    }
    cls = known.get((name or "").lower())
    if cls is None:
        raise ValueError(
            f"unknown scheduler {name!r}; expected a torch.optim.lr_scheduler class: {', '.join(sorted(known))}"
        )
    return cls


def check_scheduler(name: str | None) -> None:
    """Config validation: ``schedule.name`` names a torch scheduler class."""
    scheduler_class(name)
