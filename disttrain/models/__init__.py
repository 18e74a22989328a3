"""Models: the built-in kinds (registry entries) and the user's own through ``model.target``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn as nn

from ..errors import DisttrainError
from ..targets import TargetError, UserCodeError, call_target, import_target

if TYPE_CHECKING:
    from ..config.model import GPTConfig, MLPConfig, TargetModel

# The built-in kinds: model.kind -> "module:function", a builder(section, num_inputs, num_classes) sized
# by the built-in data. The demo models live in disttrain.examples, imported only when a config names one.
MODELS: dict[str, str] = {
    "mlp": "disttrain.examples.mlp:build",
    "gpt": "disttrain.examples.gpt:build",
}


def build_model(cfg: MLPConfig | GPTConfig, num_inputs: int, num_classes: int) -> nn.Module:
    """Build the built-in model named by ``cfg.kind``. Call after seeding: every rank must build the same weights."""
    try:
        entry = MODELS[cfg.kind]
    except KeyError:
        raise DisttrainError(f"unknown model kind {cfg.kind!r}; known: {', '.join(MODELS)}") from None
    try:
        builder = import_target(entry)
    except TargetError as exc:
        raise DisttrainError(f"model.kind {cfg.kind!r}: {exc}") from None
    return builder(cfg, num_inputs, num_classes)


def build_target_model(cfg: TargetModel, import_path: list[str]) -> nn.Module:
    """``model.target(**model.kwargs)``, which must return an nn.Module. Call after seeding."""
    model = call_target("model.target", cfg.target, import_path, **cfg.kwargs)
    if not isinstance(model, nn.Module):
        raise UserCodeError(f"model.target {cfg.target!r} returned {type(model).__name__}, expected an nn.Module")
    return model
