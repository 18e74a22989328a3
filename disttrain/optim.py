"""The ``optim`` config section as an :class:`OptimizerSpec`: any torch.optim class by name, its
keyword arguments, and no weight decay for biases and normalisation weights (the usual rule).

    optim: {name: AdamW, lr: 3.0e-4, weight_decay: 0.1, betas: [0.9, 0.95], no_decay: [bias, norm]}

The spec goes to ``build_strategy``; a strategy groups parameters with ``spec.group_of`` (by
their names in the single-process model) and builds the optimizer over those groups.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from .parallel.strategy import GroupOptions, OptimizerSpec

NO_DECAY: GroupOptions = (("weight_decay", 0.0),)


def optimizer_classes() -> dict[str, type[torch.optim.Optimizer]]:
    """torch.optim's optimizer classes by lower-case name."""
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


def optimizer_kwargs(cfg) -> dict[str, Any]:
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


def check_optimizer(cfg) -> None:
    """Raise ValueError when the class is unknown or does not take one of the keyword arguments."""
    cls = optimizer_class(cfg.name)
    bad = [k for k in optimizer_kwargs(cfg) if not _takes(cls, k)]
    if bad:
        params = inspect.signature(cls.__init__).parameters
        takes = ", ".join(k for k in params if k not in ("self", "params"))
        raise ValueError(f"torch.optim.{cls.__name__} takes no {', '.join(bad)}; it takes: {takes}")


def _is_norm(module: nn.Module) -> bool:
    norms = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm)
    return isinstance(module, norms) or type(module).__name__.endswith("Norm")


def no_decay_names(model: nn.Module, rules: list[str]) -> set[str]:
    """Names of ``model``'s parameters that ``rules`` exempt from weight decay (see OptimConfig.no_decay)."""
    out: set[str] = set()
    globs = [r for r in rules if r not in ("bias", "norm")]
    for mod_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if (
                ("bias" in rules and p_name == "bias")
                or ("norm" in rules and _is_norm(module))
                or any(fnmatch.fnmatchcase(full, g) for g in globs)
            ):
                out.add(full)
    return out


def decay_rule(model: nn.Module, rules: list[str]) -> Callable[[str, nn.Parameter], GroupOptions]:
    """``group_of(name, param)``: weight_decay 0 for the parameters ``rules`` pick, defaults otherwise."""
    exempt = no_decay_names(model, rules)

    def group_of(name: str, param: nn.Parameter) -> GroupOptions:
        return NO_DECAY if name in exempt else ()

    return group_of


def build_optimizer_spec(cfg, model: nn.Module) -> OptimizerSpec:
    """The spec of the ``optim`` section ``cfg`` for ``model`` (before any strategy wraps it)."""
    cls, kwargs = optimizer_class(cfg.name), optimizer_kwargs(cfg)
    return OptimizerSpec(build=lambda groups: cls(groups, **kwargs), group_of=decay_rule(model, cfg.no_decay))


def user_optimizer_spec(factory, model: nn.Module, rules: list[str]) -> OptimizerSpec:
    """The spec of a user's ``factory(param_groups) -> Optimizer`` (the Python API), with the same
    no-decay groups as the config would give (``weight_decay`` set only on the exempt group)."""
    if isinstance(factory, OptimizerSpec):
        return factory
    return OptimizerSpec(build=factory, group_of=decay_rule(model, rules))


def build_optimizer(cfg, params) -> torch.optim.Optimizer:
    """The optimizer of the ``optim`` section over plain ``params`` (one group, no name-based rules).
    For code that builds a bare optimizer, e.g. a peer loop in a benchmark."""
    return optimizer_class(cfg.name)(list(params), **optimizer_kwargs(cfg))
