"""Training FLOPs of a model, for the TFLOPs-per-device and MFU fields of each metrics line.

A decoder-only transformer (the built-in GPT, or a transformers model whose config names its
layers and width) costs, per token of a sequence of length T:

    6 N + 12 L d T

- ``6 N``: forward (2 N) and backward (4 N) through the weights. N counts every parameter once
  (tied weights once), less the embedding *lookups* (``nn.Embedding`` tables: token and position
  embeddings cost no multiply-adds), but with the output projection (the LM head) even when it is
  tied to the token embedding, because there it is a matmul: 2 V d per token forward.
  Norms and biases are included; they are a rounding error.
- ``12 L d T``: the attention scores (Q K^T) and their weighted sum (A V), 2 T d multiply-adds each
  per token and layer forward, times 3 with backward (PaLM's appendix B; causal masking not halved).
  ``d`` is the attention width, the config's hidden size.

T is read from each batch (its ``input_ids``, or its first tensor's second dimension), so the padded
length of a batch of ragged sequences counts. :class:`Flops` averages the FLOPs per sample over the
samples a rank read since the last metrics line; ``log.flops_per_sample`` overrides all of it (any
model). MFU is the achieved FLOP/s over the device's dense bf16 peak, known for NVIDIA GPUs by name
(:func:`peak_flops`); on the CPU there is no MFU.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn

# Dense bf16 peak FLOP/s by GPU name fragment (first match wins).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}

# transformers config keys, in the order tried: decoder layers and width (GPT-2 writes n_layer/n_embd).
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_WIDTH_KEYS = ("hidden_size", "n_embd", "d_model")


def transformer_flops_per_token(params: int, layers: int, width: int, seq_len: int) -> float:
    """Training FLOPs per token of a decoder: 6 N plus 12 L d T (see the module doc)."""
    return 6.0 * params + 12.0 * layers * width * seq_len


def peak_flops(device: str) -> float | None:
    """The dense bf16 peak of ``device`` (a CUDA device), or None when unknown or on the CPU."""
    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def matmul_params(model: nn.Module, head: nn.Module | None = None) -> int:
    """N of the module doc: unique parameters, less ``nn.Embedding`` tables, plus ``head``'s weight
    when it is one of those tables (a tied LM head)."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    n = sum(p.numel() for p in model.parameters() if id(p) not in tables)
    if head is not None and isinstance(head, nn.Linear) and id(head.weight) in tables:
        n += head.weight.numel()
    return n


@dataclass(frozen=True)
class TransformerShape:
    """What the formula needs: N, layers L and attention width d."""

    params: int
    layers: int
    width: int

    def per_sample(self, seq_len: int) -> float:
        return seq_len * transformer_flops_per_token(self.params, self.layers, self.width, seq_len)


def transformers_shape(model: nn.Module) -> TransformerShape | None:
    """The shape of a transformers ``PreTrainedModel`` from its config, or None (not one, or a config
    without decoder layers and a hidden size, e.g. a vision model)."""
    mod = sys.modules.get("transformers")  # a transformers model means transformers is imported
    if mod is None or not isinstance(model, mod.PreTrainedModel):
        return None
    conf = model.config.to_dict()
    layers = next((conf[k] for k in _LAYER_KEYS if isinstance(conf.get(k), int)), None)
    width = next((conf[k] for k in _WIDTH_KEYS if isinstance(conf.get(k), int)), None)
    if layers is None or width is None:
        return None
    return TransformerShape(matmul_params(model, model.get_output_embeddings()), layers, width)


def model_shape(model_cfg, model: nn.Module) -> TransformerShape | None:
    """The built-in GPT's shape (``model_cfg`` a GPTConfig), a transformers model's, or None."""
    from ..config import GPTConfig

    if isinstance(model_cfg, GPTConfig):
        return TransformerShape(matmul_params(model), model_cfg.n_layer, model_cfg.d_model)
    return transformers_shape(model)


def seq_len_of(batch) -> int | None:
    """The sequence length of a batch: ``input_ids``' last dimension, else the first tensor's second
    dimension (``(x, y)`` pairs, a dict's first value); None for a batch without one."""
    if isinstance(batch, Mapping):
        batch = batch["input_ids"] if "input_ids" in batch else next(iter(batch.values()), None)
    elif isinstance(batch, (tuple, list)):
        batch = batch[0] if batch else None
    if isinstance(batch, torch.Tensor) and batch.dim() >= 2:
        return int(batch.shape[1])
    return None


class Flops:
    """This rank's FLOPs per sample over a log window. ``see`` each micro-batch it trains on (local,
    cheap: one shape read), ``take`` at each metrics line: the mean since the last ``take``, or None
    where nothing is known (no formula, no override)."""

    def __init__(self, shape: TransformerShape | None, given: float | None = None, peak: float | None = None):
        self.shape, self.given = shape, given
        self.peak = peak if self.known else None  # the device's FLOP/s (MFU), where known
        self._flops = 0.0
        self._samples = 0
        self._last: float | None = None

    @property
    def known(self) -> bool:
        return self.given is not None or self.shape is not None

    def see(self, batch, samples: int) -> None:
        if self.given is not None or self.shape is None or not samples:
            return
        seq = seq_len_of(batch)
        if seq is not None:
            self._flops += samples * self.shape.per_sample(seq)
            self._samples += samples

    def take(self) -> float | None:
        if self.given is not None:
            return self.given
        if self._samples:
            self._last = self._flops / self._samples
            self._flops, self._samples = 0.0, 0
        return self._last


def build_flops(model_cfg, model: nn.Module, given: float | None, device: str = "cpu") -> Flops:
    """The trainer's counter: ``log.flops_per_sample`` when given, else the transformer formula for the
    built-in GPT or a transformers model, else nothing (no TFLOPs or MFU on the line); with the peak
    of ``device`` for MFU."""
    if given:
        return Flops(None, float(given), peak_flops(device))
    shape = model_shape(model_cfg, model)
    return Flops(shape, None, peak_flops(device) if shape is not None else None)
