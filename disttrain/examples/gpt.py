"""The ``gpt`` model kind: a small GPT, decoder-only transformer, pre-norm, learned positions, tied embeddings off.

Kept deliberately plain (nanoGPT-style) and module-named so parallelism can be applied
from outside: ``blocks`` is the unit of ZeRO-3 gathering and pipeline stages; inside a
block, ``attn.qkv``/``attn.proj`` and ``mlp.fc``/``mlp.proj`` are the column/row pairs
tensor parallelism splits; ``tok_emb`` and ``head`` are vocabulary-parallel candidates.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..parallel.pipeline.families import Stage, StageForward, Unit

if TYPE_CHECKING:
    from ..config.model import GPTConfig


class Attention(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head, self.head_dim, self.dropout = n_head, d_model // n_head, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        # Heads are read from the layer's own width, so a tensor-parallel layer with fewer heads works.
        q, k, v = self.qkv(x).split(self.qkv.out_features // 3, dim=2)
        heads = q.shape[-1] // self.head_dim
        q, k, v = (z.view(b, t, heads, self.head_dim).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, heads * self.head_dim))


class MLPBlock(nn.Module):
    def __init__(self, d_model: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.proj = nn.Linear(4 * d_model, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn, self.mlp = Attention(d_model, n_head, dropout), MLPBlock(d_model, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    # Tensor-parallel plan, declared the way transformers models declare theirs (module-path globs -> style).
    _tp_plan = {
        "tok_emb": "vocab",
        "blocks.*.attn.qkv": "colwise_qkv",  # q, k, v each split by heads
        "blocks.*.attn.proj": "rowwise",
        "blocks.*.mlp.fc": "colwise",
        "blocks.*.mlp.proj": "rowwise",
        "head": "colwise_gather",  # vocab-parallel logits (kept split when the loss is vocab-parallel)
    }

    def __init__(
        self,
        vocab_size: int,
        n_layer: int = 4,
        n_head: int = 4,
        d_model: int = 128,
        seq_len: int = 128,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.seq_len = seq_len
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(seq_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):  # GPT-2's scaled init of residual projections
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)

    def pipeline_stages(self) -> tuple[list[Unit], StageForward]:
        """Pipeline units (embeddings, each block, final norm and head) and the forward of a stage."""
        blocks = [(f"blocks.{i}",) for i in range(len(self.blocks))]
        return [("tok_emb", "pos_emb", "drop")] + blocks + [("ln_f", "head")], stage_forward

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def stage_forward(stage: Stage, x):
    """A pipeline stage of :class:`GPT`: its units of ``pipeline_stages()`` in order."""
    h = x
    for names, mods in stage.units():
        if names[0] == "tok_emb":
            tok, pos, drop = mods
            h = drop(tok(h) + pos(torch.arange(h.shape[1], device=h.device)))
        elif names[0].startswith("blocks."):
            h = mods[0](h)
        else:
            h = mods[1](mods[0](h))
    return h


def build(cfg: GPTConfig, num_inputs: int, num_classes: int) -> GPT:
    """The ``model.kind: gpt`` registry entry: a GPT over the data's vocabulary (``num_inputs`` unused)."""
    return GPT(
        vocab_size=num_classes,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        d_model=cfg.d_model,
        seq_len=cfg.seq_len,
        dropout=cfg.dropout,
    )
