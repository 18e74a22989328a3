"""Example models, built from the ``model`` config section."""

from __future__ import annotations

import torch.nn as nn


def build_model(cfg, num_inputs: int, num_classes: int) -> nn.Module:
    """Build the model named by ``cfg.kind``. Call after seeding: every rank must build the same weights."""
    if cfg.kind == "mlp":
        from .mlp import MLP

        return MLP(num_inputs, cfg.hidden, num_classes, cfg.dropout)
    if cfg.kind == "gpt":
        from .gpt import GPT

        return GPT(
            vocab_size=num_classes,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            d_model=cfg.d_model,
            seq_len=cfg.seq_len,
            dropout=cfg.dropout,
        )
    raise ValueError(f"unknown model kind {cfg.kind!r}")
