"""peft LoRA layers under tensor parallelism.

peft's ``lora.Linear`` wraps a projection (``base_layer``: an ``nn.Linear`` or GPT-2's ``Conv1D``) and
adds ``lora_B(lora_A(dropout(x))) * scaling`` per active adapter (``lora_A``: in -> r, ``lora_B``:
r -> out, both ``nn.Linear``). When the plan names such a projection, the base is split as the style
says and the adapters with it, so that each rank computes its part of the same sum:

- colwise (and ``colwise_qkv``/``colwise_packed``/``colwise_gather``): the base's output features
  and ``lora_B``'s rows are split the same way (q, k, v chunk by chunk); ``lora_A`` stays whole on
  every tp rank. The input enters the tp region once, for both paths. Each rank's gradient of
  ``lora_A`` is a partial sum (only its rows of ``lora_B`` saw the output gradient): it is marked
  partial and summed over tp by the strategy, as sequence-parallel norms are.
- rowwise: the base's input features and ``lora_A``'s columns are split; ``lora_B`` stays whole.
  ``lora_B(lora_A_local(x_local))`` is a partial sum like the base's product, so the two are added
  and the output is reduced once (linearity); the bias is added after it. ``lora_B``'s gradient is
  partial (its input was), marked and summed over tp.

Parameter names are unchanged (``...c_attn.base_layer.weight``, ``...c_attn.lora_A.default.weight``)
and split ones carry their :class:`~.parallel.TPSlice`, so checkpoints consolidate into the
single-process peft model. Local: no communication at construction.
"""

from __future__ import annotations

import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from .parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    TPContext,
    TPSlice,
    _enter,
    _take,
    mark_partial_grad,
)


def is_lora_layer(mod: nn.Module) -> bool:
    """True for a peft LoRA layer (looked up only if the process imported peft)."""
    if sys.modules.get("peft") is None:
        return False
    from peft.tuners.lora import LoraLayer

    return isinstance(mod, LoraLayer)


def lora_problem(mod: nn.Module, style: str) -> str | None:
    """Why ``mod`` (a peft LoRA layer) cannot be split as ``style``, or None."""
    from peft.tuners.lora import Linear as LoraLinear

    if not isinstance(mod, LoraLinear):
        return f"a peft {type(mod).__name__} (only LoRA on linear projections is split by tensor parallel)"
    if style not in ("colwise", "colwise_gather", "colwise_qkv", "colwise_packed", "rowwise"):
        return f"a peft LoRA layer, which {style} cannot apply to"
    if mod.merged:
        return "a peft LoRA layer with merged adapters (unmerge them before training)"
    if any(mod.lora_variant.values()) or any(mod.use_dora.values()):
        return "a peft LoRA layer with a variant (DoRA): only plain LoRA is split"
    if any(mod.lora_bias.values()):
        return "a peft LoRA layer with lora_bias: only bias-free adapters are split"
    return None


class _Piece(nn.Module):
    """An adapter matrix cut for this rank (``weight`` keeps its name, so the checkpoint's does)."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def _adapters(source: nn.Module) -> list[str]:
    return [] if source.disable_adapters else [a for a in source.active_adapters if a in source.lora_A]


class LoRAColumnParallel(nn.Module):
    """A colwise projection with LoRA adapters: base and ``lora_B`` split by output features."""

    def __init__(self, source: nn.Module, ctx: TPContext, partitions: int, gather_output: bool, shared: dict):
        super().__init__()
        self.base_layer = ColumnParallelLinear(source.base_layer, ctx, partitions, gather_output, shared)
        self.lora_A, self.lora_dropout = source.lora_A, source.lora_dropout
        for a in self.lora_A.values():
            mark_partial_grad(a.weight)
        pieces = self.base_layer.pieces
        self.lora_B = nn.ModuleDict(
            {
                k: _Piece(_take(b.weight, TPSlice(tuple(b.weight.shape), 0, pieces), shared))
                for k, b in source.lora_B.items()
            }
        )
        self.scaling, self.adapters = dict(source.scaling), _adapters(source)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        x = _enter(x, base.ctx)
        # dropout on the replicated input before the sharded region: the same mask on every tp rank
        low = [(a, self.lora_A[a](self.lora_dropout[a](x.to(self.lora_A[a].weight.dtype)))) for a in self.adapters]
        base.ctx.sharded_region()
        y = base.local(x)
        out = y
        for a, h in low:
            out = out + self.lora_B[a](h) * self.scaling[a]
        return base.finish(out.to(y.dtype))


class LoRARowParallel(nn.Module):
    """A rowwise projection with LoRA adapters: base and ``lora_A`` split by input features."""

    def __init__(self, source: nn.Module, ctx: TPContext, shared: dict):
        super().__init__()
        self.base_layer = RowParallelLinear(source.base_layer, ctx, shared)
        pieces = self.base_layer.pieces
        self.lora_A = nn.ModuleDict(
            {
                k: _Piece(_take(a.weight, TPSlice(tuple(a.weight.shape), 1, pieces), shared))
                for k, a in source.lora_A.items()
            }
        )
        self.lora_B, self.lora_dropout = source.lora_B, source.lora_dropout
        for b in self.lora_B.values():
            mark_partial_grad(b.weight)
        self.scaling, self.adapters = dict(source.scaling), _adapters(source)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        y = base.partial(x)
        out = y
        for a in self.adapters:
            h = self.lora_A[a](self.lora_dropout[a](x.to(self.lora_A[a].weight.dtype)))
            out = out + self.lora_B[a](h) * self.scaling[a]
        return base.finish(out.to(y.dtype))


def parallel_lora(source: nn.Module, style: str, partitions: int, ctx: TPContext, shared: dict) -> nn.Module:
    """The tensor-parallel replacement of a peft LoRA layer (checked by :func:`lora_problem`)."""
    if style == "rowwise":
        return LoRARowParallel(source, ctx, shared)
    return LoRAColumnParallel(source, ctx, partitions, style == "colwise_gather", shared)
