"""Rank functions: forwards without gradients under ZeRO-3 in a user's own loop.

Every ZeRO-3 forward gathers parameters collectively, so every rank must run the same forwards.
:func:`uneven_case` makes rank ``extra_on`` run one more ``no_grad`` forward than its peers before a
training step: the ranks must stop with an error naming the ranks and the rule, never hang.
"""

from __future__ import annotations

import torch

import collectives
from disttrain.parallel import OptimizerSpec, build_strategy
from disttrain.session import build_run_model, seed_everything
from tests.cases.deferred import make_config


def _zero3_llama(timeout: float):
    """(comm, ZeRO-3 strategy over a 2-layer Llama, a fixed batch of token ids) on the torch backend."""
    cfg = make_config("tests.cases.deferred:llama", {"layers": 2}, "zero3")
    comm = collectives.init("torch", timeout=timeout)
    seed_everything(cfg.run.seed)
    spec = OptimizerSpec(build=lambda groups: torch.optim.AdamW(groups, lr=1e-2))
    s = build_strategy(cfg.parallel, build_run_model(cfg, None, []), spec, comm)
    return comm, s, torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))


def uneven_case(extra_on: int = 0, then: str = "train", timeout: float = 20.0) -> dict:
    """Two ``no_grad`` forwards on rank ``extra_on``, one elsewhere; ``then``: ``train`` (a training
    step follows) or ``barrier`` (the peers go on to a barrier of the whole group)."""
    comm, s, ids = _zero3_llama(timeout)
    s.model.eval()
    with torch.no_grad():
        s.model(ids)
        if comm.rank == extra_on:
            s.model(ids)
    s.model.train()
    if then == "train":
        with s.accumulate(True):
            s.model(ids).logits.float().sum().backward()
        s.finish_gradients()
        s.optimizer_step()
    comm.barrier()
    comm.close()
    return {"rank": comm.rank}


def even_case(forwards: int = 3) -> float:
    """The same number of ``no_grad`` forwards everywhere, then a training step: runs through."""
    comm, s, ids = _zero3_llama(60)
    s.model.eval()
    with torch.no_grad():
        outs = [float(s.model(ids).logits.float().sum()) for _ in range(forwards)]
    s.model.train()
    with s.accumulate(True):
        loss = s.model(ids).logits.float().sum()
        loss.backward()
    s.finish_gradients()
    s.optimizer_step()
    comm.barrier()
    comm.close()
    assert len(set(outs)) == 1
    return outs[0]
