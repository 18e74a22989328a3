"""The ``optim:`` section: any torch.optim class by name, weight decay groups, clipping."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from .section import Section


class OptimConfig(Section):
    name: str = Field(
        "adamw", description="Any torch.optim class, by name (case-insensitive): AdamW, SGD, Adam, RMSprop, ..."
    )
    lr: float = Field(3e-3, gt=0, description="Peak learning rate (the schedule scales it).")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay of the parameters not matched by no_decay.")
    no_decay: list[str] = Field(
        ["bias", "norm"],
        description="Parameters trained without weight decay: 'bias' (every parameter named bias), 'norm' "
        "(the weights of normalisation layers: torch's *Norm classes and any module class named *Norm), "
        "or fnmatch globs over parameter names (e.g. '*.wpe.weight'). [] decays everything.",
    )
    betas: tuple[float, float] | None = Field(None, description="Shorthand for kwargs.betas (Adam family).")
    momentum: float | None = Field(None, ge=0, description="Shorthand for kwargs.momentum (SGD, RMSprop).")
    kwargs: dict[str, Any] = Field({}, description="Other keyword arguments of the optimizer class, e.g. eps.")
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm to this (0: off).")

    @model_validator(mode="after")
    def _known_optimizer(self) -> OptimConfig:
        from ..optim import check_optimizer  # torch is imported only when an optim section is validated

        check_optimizer(self)
        return self
