"""The ``optim`` config section as an :class:`OptimizerSpec`: any torch.optim class by name, its
keyword arguments, and no weight decay for biases and normalisation weights (the usual rule).

    optim: {name: AdamW, lr: 3.0e-4, weight_decay: 0.1, betas: [0.9, 0.95], no_decay: [bias, norm]}

The spec goes to ``build_strategy``; a strategy groups parameters with ``spec.group_of`` (by
their names in the single-process model) and builds the optimizer over those groups.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

import torch
import torch.nn as nn

from .config.optim import OptimConfig, optimizer_class, optimizer_kwargs
from .parallel.strategy import GroupOptions, OptimizerSpec

NO_DECAY: GroupOptions = (("weight_decay", 0.0),)


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


def build_optimizer_spec(cfg: OptimConfig, model: nn.Module) -> OptimizerSpec:
    """The spec of the ``optim`` section ``cfg`` for ``model`` (before any strategy wraps it)."""
    cls, kwargs = optimizer_class(cfg.name), optimizer_kwargs(cfg)
    return OptimizerSpec(build=lambda groups: cls(groups, **kwargs), group_of=decay_rule(model, cfg.no_decay))


def user_optimizer_spec(factory, model: nn.Module, rules: list[str]) -> OptimizerSpec:
    """The spec of a user's ``factory(param_groups) -> Optimizer`` (the Python API), with the same
    no-decay groups as the config would give (``weight_decay`` set only on the exempt group)."""
    if isinstance(factory, OptimizerSpec):
        return factory
    return OptimizerSpec(build=factory, group_of=decay_rule(model, rules))


def build_optimizer(cfg: OptimConfig, params) -> torch.optim.Optimizer:
    """The optimizer of the ``optim`` section over plain ``params`` (one group, no name-based rules).
    For code that builds a bare optimizer, e.g. a peer loop in a benchmark."""
    return optimizer_class(cfg.name)(list(params), **optimizer_kwargs(cfg))
