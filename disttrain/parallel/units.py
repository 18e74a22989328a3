"""Which submodules are a model's *units*: what ZeRO-3 gathers one at a time and what activation
checkpointing recomputes (``parallel.zero.units``, ``parallel.activation_checkpointing``).

``parallel.zero.units`` lists patterns; a module matches a pattern equal to its class name
(``GPT2Block``) or an ``fnmatch`` glob of its path (``transformer.h.*``, ``blocks.*``). Without
patterns the default is, in order: the classes a transformers model declares it must not split
(``_no_split_modules``, i.e. its transformer blocks), the children of the largest ModuleList or
Sequential whose children are all of one class (a stack of identical blocks), and otherwise the
model's top-level children. Only the outermost match counts (a unit is never inside another),
and only modules with trainable parameters become units.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import logging

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)


def _trainable(m: nn.Module) -> bool:
    return any(p.requires_grad for p in m.parameters())


def _outermost(named: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    out: list[tuple[str, nn.Module]] = []
    for name, m in named:  # named_modules order: a parent comes before its children
        if not any(name.startswith(p + ".") for p, _ in out) and all(m is not o for _, o in out):
            out.append((name, m))
    return out


def _matches(name: str, m: nn.Module, patterns: list[str]) -> bool:
    cls = type(m).__name__
    return any(p == cls or fnmatch.fnmatchcase(name, p) for p in patterns)


def _identical_stack(model: nn.Module) -> list[tuple[str, nn.Module]]:
    best: list[tuple[str, nn.Module]] = []
    best_size = 0
    for name, m in model.named_modules():
        if not isinstance(m, (nn.ModuleList, nn.Sequential)) or len(m) < 2:
            continue
        kids = list(m.named_children())
        if len({type(c) for _, c in kids}) != 1:
            continue
        size = sum(p.numel() for p in m.parameters())
        if size > best_size:
            prefix = f"{name}." if name else ""
            best, best_size = [(prefix + k, c) for k, c in kids], size
    return best


def find_units(model: nn.Module, patterns: list[str] | None = None) -> list[tuple[str, nn.Module]]:
    """(path, module) of the units of ``model``, in registration order (see the module docstring). Local."""
    named = [(n, m) for n, m in model.named_modules() if n]
    if patterns:
        found = _outermost([(n, m) for n, m in named if _matches(n, m, patterns)])
        if not found:
            raise ValueError(
                f"parallel.zero.units: no module of {type(model).__name__} matches {patterns}\n"
                "HINT: give class names (e.g. GPT2Block) or module-path globs (e.g. transformer.h.*)"
            )
    else:
        no_split = sorted(getattr(model, "_no_split_modules", None) or [])  # transformers' declared blocks
        found = _outermost([(n, m) for n, m in named if type(m).__name__ in no_split]) if no_split else []
        found = found or _identical_stack(model)
        found = found or list(model.named_children())
    return [(n, m) for n, m in found if _trainable(m)]


@contextlib.contextmanager
def _buffers_kept(module: nn.Module):
    """The recomputation must not count twice: BatchNorm's running statistics (and any buffer the
    forward updates) are put back as the real forward left them."""
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


def _checkpointed(module: nn.Module, forward, *args, **kwargs):
    return checkpoint(
        forward,
        *args,
        use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), _buffers_kept(module)),
        **kwargs,
    )


def apply_activation_checkpointing(units: list[tuple[str, nn.Module]]) -> None:
    """Recompute each unit's forward during backward instead of keeping its activations
    (``torch.utils.checkpoint``, non-reentrant, RNG state preserved, buffers not updated twice).
    Module hooks still run once per real forward. Local."""
    for _, m in units:
        m.forward = functools.partial(_checkpointed, m, m.forward)
    log.info("activation checkpointing over %d units", len(units))
