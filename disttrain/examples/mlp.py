"""The ``mlp`` model kind: a multi-layer perceptron classifier (the digits example)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from ..config.model import MLPConfig


class MLP(nn.Module):
    def __init__(self, num_inputs: int, hidden: list[int], num_classes: int, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        width = num_inputs
        for h in hidden:
            layers += [nn.Linear(width, h), nn.GELU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build(cfg: MLPConfig, num_inputs: int, num_classes: int) -> MLP:
    """The ``model.kind: mlp`` registry entry, sized by the data."""
    return MLP(num_inputs, cfg.hidden, num_classes, cfg.dropout)
