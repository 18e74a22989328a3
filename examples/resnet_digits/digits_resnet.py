"""A transformers ResNet (with BatchNorm) on scikit-learn's digits upsampled to 3x32x32, as a user
would bring it: a model factory and a dataset factory. The built-in cross-entropy step reads the
model's ImageClassifierOutput (its ``logits``) from (pixel_values, label) batches.

BatchNorm in train mode normalises over each rank's share of the batch (as with torch DDP), so
N ranks differ slightly from one process. ``frozen_batchnorm=True`` makes BatchNorm use its
running statistics (fine-tuning style): then N ranks equal one process exactly.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset
from transformers import ResNetConfig, ResNetForImageClassification


def _keep_eval(module: nn.Module, args) -> None:
    module.train(False)


def build_model(
    embedding_size: int = 16,
    hidden_sizes: tuple[int, ...] = (16, 32),
    depths: tuple[int, ...] = (1, 1),
    frozen_batchnorm: bool = False,
) -> ResNetForImageClassification:
    """ResNetForImageClassification from a ResNetConfig (no download), 10 classes, 3-channel input."""
    cfg = ResNetConfig(
        num_channels=3,
        embedding_size=embedding_size,
        hidden_sizes=list(hidden_sizes),
        depths=list(depths),
        layer_type="basic",
        num_labels=10,
    )
    model = ResNetForImageClassification(cfg)
    if frozen_batchnorm:
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.register_forward_pre_hook(_keep_eval)
    return model


def digits(size: int = 32, eval_fraction: float = 0.2) -> tuple[TensorDataset, TensorDataset]:
    """(train, eval) of (3 x size x size image, label); a fixed split."""
    from sklearn.datasets import load_digits

    ds = load_digits()
    x = torch.tensor(ds.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    x = ((x - 0.5) / 0.5).contiguous()
    y = torch.tensor(ds.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    n_eval = int(len(x) * eval_fraction)
    ev, tr = perm[:n_eval], perm[n_eval:]
    return TensorDataset(x[tr], y[tr]), TensorDataset(x[ev], y[ev])
