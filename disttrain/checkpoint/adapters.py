"""State shards of strategies that do not provide their own.

A strategy with ``state_shards``/``load_state_shards`` (see disttrain/parallel/strategy.py)
is used as is. Otherwise the model and optimizer are taken to be whole and identical on
every rank (plain data parallel): every tensor is one replicated box, and the writer saves
each once, spreading them over the ranks.
"""

from __future__ import annotations

import torch

from ..parallel.strategy import Shard


def _full(t: torch.Tensor) -> tuple[tuple[int, int], ...]:
    return tuple((0, s) for s in t.shape)


def state_shards(strategy) -> list[Shard]:
    own = getattr(strategy, "state_shards", None)
    if own is not None:
        return own()
    out = []
    names = {p: n for n, p in strategy.model.named_parameters()}
    for n, p in strategy.model.named_parameters():
        out.append(Shard(f"model.{n}", p.detach(), tuple(p.shape), _full(p), replicated=True))
    for p, st in strategy.optimizer.state.items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                out.append(Shard(f"optim.{names[p]}.{k}", v.detach(), tuple(v.shape), _full(v), replicated=True))
    return out


@torch.no_grad()
def load_state_shards(strategy, read) -> None:
    own = getattr(strategy, "load_state_shards", None)
    if own is not None:
        return own(read)
    for n, p in strategy.model.named_parameters():
        p.copy_(read(f"model.{n}", tuple(p.shape), _full(p), False))
    for n, p in strategy.model.named_parameters():
        prefix = f"optim.{n}."
        keys = [k[len(prefix) :] for k in read.names if k.startswith(prefix)]
        if not keys:
            continue
        st = strategy.optimizer.state[p]
        for k in keys:
            shape = tuple(read.shape(f"{prefix}{k}"))
            t = read(f"{prefix}{k}", shape, tuple((0, s) for s in shape), False)
            old = st.get(k)
            st[k] = (
                t.to(device=p.device if t.dim() else "cpu")
                if not isinstance(old, torch.Tensor)
                else old.copy_(t)
                if old.shape == t.shape
                else t.to(old.device)
            )
