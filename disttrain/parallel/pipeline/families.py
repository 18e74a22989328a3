"""Pipeline families: the units and stage forward of models whose forward is not a plain sequence.

transformers' Llama-style causal LMs (Llama, Qwen2, Mistral: ``model.embed_tokens``,
``model.layers.*``, ``model.norm``, ``lm_head``) and transformers GPT-2 are recognised by their
class and module names. Users bring these models, so their stage forwards live in the library,
apart from the generic split in ``split.py``. Any other model may name its own units and stage
forward by implementing :class:`DeclaresStages` (the demo GPT in ``disttrain.examples.gpt`` does).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn as nn

Unit = tuple[str, ...]


class Stage(Protocol):
    """What a stage forward reads of its stage: the whole model (for shared state such as the
    rotary embedding) and its units in order, each as (module paths, modules)."""

    @property
    def root(self) -> nn.Module: ...

    def units(self) -> list[tuple[Unit, list[nn.Module]]]: ...


StageForward = Callable[[Stage, Any], Any]


@runtime_checkable
class DeclaresStages(Protocol):
    """A model that names its own pipeline units (module paths, in model order) and the stage
    forward that runs a contiguous run of them (called as ``forward(stage, x)``)."""

    def pipeline_stages(self) -> tuple[list[Unit], StageForward]: ...


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _causal_mask(config, h: torch.Tensor, pos: torch.Tensor):
    from transformers.masking_utils import create_causal_mask

    kwargs = {"config": config, "inputs_embeds": h, "attention_mask": None, "position_ids": pos}
    params = inspect.signature(create_causal_mask).parameters  # the cache argument was renamed in 5.x
    kwargs["cache" if "cache" in params else "past_key_values"] = None
    if "cache_position" in params:
        kwargs["cache_position"] = pos[0]
    return create_causal_mask(**kwargs)


def llama_forward(stage: Stage, x):
    """A stage of a transformers Llama-style causal LM: embeddings, decoder layers, norm and head."""
    base = stage.root.model
    h, ctx = x, None
    for names, mods in stage.units():
        if names[0] == "model.embed_tokens":
            h = mods[0](h)
        elif names[0].startswith("model.layers."):
            if ctx is None:
                pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
                ctx = (_causal_mask(base.config, h, pos), pos, base.rotary_emb(h, position_ids=pos))
            h = _first(mods[0](h, attention_mask=ctx[0], position_ids=ctx[1], position_embeddings=ctx[2]))
        else:  # norm, lm_head
            h = mods[1](mods[0](h))
    return h


def gpt2_forward(stage: Stage, x):
    """A stage of transformers GPT-2: token and position embeddings, blocks, final norm and head."""
    tr = stage.root.transformer
    h, mask = x, None
    for names, mods in stage.units():
        if names[0] == "transformer.wte":
            wte, wpe, drop = mods
            pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
            h = drop(wte(h) + wpe(pos))
        elif names[0].startswith("transformer.h."):
            if mask is None:
                pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
                mask = _causal_mask(tr.config, h, pos)
            h = _first(mods[0](h, attention_mask=mask))
        else:  # ln_f, lm_head
            h = mods[1](mods[0](h))
    return h


def family(model: nn.Module) -> tuple[list[Unit], StageForward] | None:
    """(units, stage forward) of a model that declares its stages or of a known family, else None."""
    if isinstance(model, DeclaresStages):
        return model.pipeline_stages()
    name = type(model).__name__
    mods = dict(model.named_modules())
    if name.endswith("ForCausalLM") and {"model.embed_tokens", "model.layers", "model.norm", "lm_head"} <= set(mods):
        n = len(mods["model.layers"])
        units = [("model.embed_tokens",)] + [(f"model.layers.{i}",) for i in range(n)] + [("model.norm", "lm_head")]
        return units, llama_forward
    if name == "GPT2LMHeadModel":
        n = len(mods["transformer.h"])
        units = [("transformer.wte", "transformer.wpe", "transformer.drop")]
        return units + [(f"transformer.h.{i}",) for i in range(n)] + [("transformer.ln_f", "lm_head")], gpt2_forward
    return None
