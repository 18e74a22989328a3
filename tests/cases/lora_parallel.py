"""Rank functions: a peft LoRA fine-tune of a transformers Llama under tensor and pipeline parallel.

:func:`llama_peft` puts LoRA adapters on ``q_proj``/``v_proj`` (colwise in Llama's plan) and on
``o_proj``/``down_proj`` (rowwise); :func:`train_case` trains it a few AdamW steps on fixed token
batches through the strategy a run builds (``build_run_model`` + ``build_strategy``) and returns every
model piece this rank holds (name, box, values), the losses and the names with optimizer state.
"""

from __future__ import annotations

import torch

import collectives
from disttrain.parallel import OptimizerSpec, build_strategy
from disttrain.parallel.tensor.vocab import cross_entropy
from disttrain.session import build_run_model, seed_everything
from tests.cases.deferred import llama, make_config

TARGET = "tests.cases.lora_parallel:llama_peft"
TARGETS = ("q_proj", "v_proj", "o_proj", "down_proj")


def llama_peft(layers: int = 2, hidden: int = 32, vocab: int = 64, r: int = 4, targets: tuple = TARGETS):
    """A Llama with every weight frozen and rank-``r`` LoRA adapters (peft) on ``targets``."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(llama(layers, hidden, vocab), LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets)))


def train_case(tp: int = 1, pp: int = 1, steps: int = 3, kwargs: dict | None = None) -> dict:
    """``steps`` AdamW steps (weight decay 0.1: a frozen weight that reached the optimizer would move) of
    the next-token loss on 4 x 16 tokens, the global batch split over dp ranks."""
    cfg = make_config(TARGET, kwargs or {}, "ddp", tp, pp)
    comm = collectives.init("torch", timeout=120)
    seed_everything(cfg.run.seed)
    spec = OptimizerSpec(build=lambda groups: torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1))
    s = build_strategy(cfg.parallel, build_run_model(cfg, None, []), spec, comm)
    g = torch.Generator().manual_seed(7)
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, 64, (4, 16), generator=g)
        mine = ids.tensor_split(s.dp_size)[s.dp_rank]
        target = torch.cat([mine[:, 1:], torch.full((mine.shape[0], 1), -100)], dim=1)
        n = ids.shape[0] * (ids.shape[1] - 1)
        if pp > 1:
            losses.append(float(s.forward_backward([(mine, target)], lambda out, y, n=n: cross_entropy(out, y) / n)))
        else:
            with s.accumulate(True):
                loss = cross_entropy(s.model(mine).logits, target) / n
                loss.backward()
            losses.append(float(loss))
        s.finish_gradients()
        s.optimizer_step()
        s.zero_grad()
    pieces = [
        {
            "name": sh.name[len("model.") :],
            "box": [list(b) for b in sh.box],
            "flat": sh.flat,
            "values": sh.tensor.detach().float().reshape(-1).tolist(),
        }
        for sh in s.state_shards()
        if sh.name.startswith("model.")
    ]
    optim_names = sorted({sh.name.rsplit(".", 1)[0] for sh in s.state_shards() if sh.name.startswith("optim.")})
    comm.barrier()
    comm.close()
    return {"pieces": pieces, "losses": losses, "optim_names": optim_names}
