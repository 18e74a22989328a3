"""Optimizer-state helpers shared by data parallel and ZeRO: checkpoint naming and memory.

Logical names (the checkpoint contract): ``model.<param>`` and ``optim.<param>.<key>``
with the optimizer's own state keys (AdamW: ``exp_avg``, ``exp_avg_sq``, ``step``;
SGD: ``momentum_buffer``).
"""

from __future__ import annotations

import logging

import torch


def materialize_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's state (before its first step) so a checkpoint can be loaded into it.

    Generic: one step with zero gradients and lr 0 leaves AdamW/SGD parameters unchanged and
    creates every state tensor; the caller then overwrites them all from the checkpoint.
    Local; no communication.
    """
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if all(optimizer.state.get(p) for p in params):
        return
    saved_grads = [p.grad for p in params]
    lrs = [g["lr"] for g in optimizer.param_groups]
    try:
        for p in params:
            p.grad = torch.zeros_like(p)
        for g in optimizer.param_groups:
            g["lr"] = 0.0
        optimizer.step()
    finally:
        for p, g in zip(params, saved_grads):
            p.grad = g
        for g, lr in zip(optimizer.param_groups, lrs):
            g["lr"] = lr


def state_tensors(optimizer: torch.optim.Optimizer, param) -> dict[str, torch.Tensor]:
    """The tensor-valued state of ``param`` (SGD without momentum stores None: skipped)."""
    return {k: v for k, v in optimizer.state.get(param, {}).items() if isinstance(v, torch.Tensor)}


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one buffer count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        s = t.untyped_storage()
        if s.nbytes():
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    return storage_bytes(v for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor))


def track_state_bytes(strategy, steps: int, peak: int) -> int:
    """Peak per-rank params+grads+optimizer bytes of ``strategy`` (its ``memory_bytes()``), measured on the
    first two steps only: sizes are fixed once the optimizer state exists. Logs the split at step 1."""
    if steps > 2:
        return peak
    mem = strategy.memory_bytes()
    if steps == 1:
        logging.getLogger(strategy.__class__.__module__).info(
            "rank %d: per-rank state %s",
            strategy.comm.rank,
            ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in mem.items()),
        )
    return max(peak, sum(mem.values()))
