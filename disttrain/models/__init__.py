"""Models: the built-in kinds (registry entries) and the user's own through ``model.target``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn as nn

from ..errors import DisttrainError
from ..targets import UserCodeError, call_target


def _mlp(cfg, num_inputs: int, num_classes: int) -> nn.Module:
    from .mlp import MLP

    return MLP(num_inputs, cfg.hidden, num_classes, cfg.dropout)


def _gpt(cfg, num_inputs: int, num_classes: int) -> nn.Module:
    from .gpt import GPT

    return GPT(
        vocab_size=num_classes,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        d_model=cfg.d_model,
        seq_len=cfg.seq_len,
        dropout=cfg.dropout,
    )


# The built-in kinds: model.kind -> builder(section, num_inputs, num_classes), sized by the built-in data.
MODELS: dict[str, Callable[[Any, int, int], nn.Module]] = {"mlp": _mlp, "gpt": _gpt}


def build_model(cfg, num_inputs: int, num_classes: int) -> nn.Module:
    """Build the built-in model named by ``cfg.kind``. Call after seeding: every rank must build the same weights."""
    try:
        builder = MODELS[cfg.kind]
    except KeyError:
        raise DisttrainError(f"unknown model kind {cfg.kind!r}; known: {', '.join(MODELS)}") from None
    return builder(cfg, num_inputs, num_classes)


def build_target_model(cfg, import_path: list[str]) -> nn.Module:
    """``model.target(**model.kwargs)``, which must return an nn.Module. Call after seeding."""
    model = call_target("model.target", cfg.target, import_path, **cfg.kwargs)
    if not isinstance(model, nn.Module):
        raise UserCodeError(f"model.target {cfg.target!r} returned {type(model).__name__}, expected an nn.Module")
    return model
