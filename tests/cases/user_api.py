"""Rank functions for the Python API: a user's own loop (disttrain.init / setup / batches /
backward / step) and disttrain.fit, on variable-length sequences padded per batch, so the ranks'
token counts differ and only a division by the global count gives one process's gradient."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.data import Dataset

import disttrain
from disttrain.loss import cross_entropy_step

VOCAB = 11


class Ragged(Dataset):
    """Sequence i: 2 + i % 5 tokens; its labels are the tokens shifted by one position (mod VOCAB)."""

    def __init__(self, n: int = 40):
        g = torch.Generator().manual_seed(7)
        self.seqs = [torch.randint(0, VOCAB, (2 + i % 5,), generator=g) for i in range(n)]

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, i: int):
        return self.seqs[i]


def pad(samples: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    width = max(len(s) for s in samples)
    ids = torch.zeros(len(samples), width, dtype=torch.int64)
    labels = torch.full((len(samples), width), -100, dtype=torch.int64)
    for row, s in enumerate(samples):
        ids[row, : len(s)] = s
        labels[row, : len(s)] = (s + 1) % VOCAB
    return {"input_ids": ids, "labels": labels}


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, VOCAB)

    def forward(self, input_ids):
        return {"logits": self.out(self.norm(self.emb(input_ids)))}


class Tokens(Dataset):
    """transformers-style causal-LM samples: ``labels`` are the ``input_ids`` (the loss shifts them)."""

    def __init__(self, n: int = 40, seq: int = 8):
        self.ids = torch.randint(0, VOCAB, (n, seq), generator=torch.Generator().manual_seed(5))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2(seed: int = 0):
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=8, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg)


def train(config: str, overrides: list[str], mode: str) -> dict:
    if mode == "hf_fit":  # the built-in step on a transformers causal LM
        summary = disttrain.fit(model=tiny_gpt2(), data=(Tokens(), None), config=config, argv=overrides)
        return {"summary": summary}
    if mode == "fit":
        torch.manual_seed(0)
        summary = disttrain.fit(
            model=Tiny(), data=(Ragged(), Ragged(12)), config=config, argv=overrides, collate_fn=pad
        )
        return {"summary": summary}
    run = disttrain.init(config, overrides)
    model, opt = run.setup(Tiny(), lambda groups: torch.optim.AdamW(groups, lr=0.01, weight_decay=0.1))
    decays = sorted(g["weight_decay"] for g in opt.param_groups)
    steps, dtypes = 0, set()
    for batch in run.batches(Ragged(), collate_fn=pad):
        with torch.no_grad():
            dtypes.add(str(model(batch["input_ids"])["logits"].dtype))  # what the user's loss receives
        loss_sum, count, _ = cross_entropy_step(model, batch)
        run.backward(loss_sum, count)
        steps += run.step()
    params = {n: p.detach().reshape(-1).tolist() for n, p in model.named_parameters()}
    result = {"params": params, "decays": decays, "steps_here": steps, "global_step": run.global_step,
              "logits_dtypes": sorted(dtypes)}  # fmt: skip
    run.finish()
    return result
