"""The ``optim:`` section: any torch.optim class by name, weight decay groups, clipping; and the
look-ups that validate it (the class by name, the keyword arguments it takes)."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

from pydantic import Field, model_validator

from .section import Section

if TYPE_CHECKING:
    import torch


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
        check_optimizer(self)  # torch is imported only when an optim section is validated
        return self


def optimizer_classes() -> dict[str, type[torch.optim.Optimizer]]:
    """torch.optim's optimizer classes by lower-case name (torch is imported on the first call)."""
    import torch

    out = {}
    for name in dir(torch.optim):
        obj = getattr(torch.optim, name)
        if isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer) and obj is not torch.optim.Optimizer:
            out[name.lower()] = obj
    return out


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    classes = optimizer_classes()
    cls = classes.get(name.lower())
    if cls is None:
        known = ", ".join(sorted(c.__name__ for c in classes.values()))
        raise ValueError(f"no optimizer {name!r} in torch.optim; known: {known}")
    return cls


def _takes(cls: type, name: str) -> bool:
    params = inspect.signature(cls.__init__).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def optimizer_kwargs(cfg: OptimConfig) -> dict[str, Any]:
    """Constructor keyword arguments of the ``optim`` section (lr, and weight_decay where the class has it)."""
    kw: dict[str, Any] = {"lr": cfg.lr}
    if cfg.weight_decay or _takes(optimizer_class(cfg.name), "weight_decay"):
        kw["weight_decay"] = cfg.weight_decay
    if cfg.betas is not None:
        kw["betas"] = tuple(cfg.betas)
    if cfg.momentum is not None:
        kw["momentum"] = cfg.momentum
    kw.update(cfg.kwargs)
    return kw


def check_optimizer(cfg: OptimConfig) -> None:
    """Raise ValueError when the class is unknown or does not take one of the keyword arguments."""
    cls = optimizer_class(cfg.name)
    bad = [k for k in optimizer_kwargs(cfg) if not _takes(cls, k)]
    if bad:
        params = inspect.signature(cls.__init__).parameters
        takes = ", ".join(k for k in params if k not in ("self", "params"))
        raise ValueError(f"torch.optim.{cls.__name__} takes no {', '.join(bad)}; it takes: {takes}")
