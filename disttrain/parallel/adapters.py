"""Models under adapters (peft): the parallel layouts split the model the adapters wrap.

``peft.get_peft_model(model, LoraConfig(...))`` returns a ``PeftModel`` whose parameter names start
with ``base_model.model.`` (``base_model`` is peft's tuner, ``.model`` the user's transformers model,
its projections replaced by adapter layers in place). A tensor-parallel plan and a pipeline family
are written for the wrapped model (``transformer.h.*.attn.c_attn``, GPT-2's stage units), so the
strategies apply them to :func:`adapted_base`'s model while the checkpoints keep peft's names: a
consolidated file strict-loads into a fresh peft model. A configured plan may name modules with
the prefix or without (:func:`plan_for_base`).
"""

from __future__ import annotations

import sys

import torch.nn as nn


def adapted_base(model: nn.Module) -> tuple[nn.Module, str]:
    """(the model under the adapters, the prefix of its names in ``model``); ``(model, "")`` for a model
    without adapters. Local. peft is looked up only if the process imported it (a peft model exists
    only then)."""
    peft = sys.modules.get("peft")
    if peft is None or not isinstance(model, peft.PeftModel):
        return model, ""
    from peft.tuners.tuners_utils import BaseTuner

    tuner = model.base_model
    if isinstance(tuner, BaseTuner):  # LoRA and the other injected adapters: tuner.model is the user's model
        return tuner.model, "base_model.model."
    return tuner, "base_model."  # prompt learning: the user's model itself


def plan_for_base(plan: dict[str, str] | None, prefix: str) -> dict[str, str] | None:
    """``parallel.tp.plan`` in the base model's names (a glob written with peft's prefix loses it)."""
    if not plan or not prefix:
        return plan
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in plan.items()}
