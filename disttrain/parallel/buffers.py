"""Module state that is not a trained parameter: buffers (BatchNorm's running statistics, counters).

Every strategy starts every rank from rank 0's parameters *and* buffers, keeps buffers equal on
every rank (as torch DDP's ``broadcast_buffers``: rank 0's after each step, unless BatchNorm is
synchronised so they never drift), and puts each persistent buffer into its checkpoint shards as
``model.<name>``, whole and replicated. Non-persistent buffers (``persistent=False``: causal masks,
rotary tables) are rebuilt by the model itself and are neither broadcast nor saved, as in
``state_dict()``.

Tied parameters and buffers (one tensor under several names, e.g. GPT-2's ``lm_head.weight`` is
``transformer.wte.weight``) are reduced, stored and saved once, under their first name;
:func:`aliases` names the others so a consolidated file can hold every name ``state_dict()`` has.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from collectives import Communicator

from .strategy import Shard, ShardReader


def full_box(shape) -> tuple:
    return tuple((0, int(s)) for s in shape)


def persistent_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, buffer) for every buffer ``state_dict()`` would hold, each tensor once (first name)."""
    out, seen = [], set()
    for mod_name, mod in model.named_modules():
        for name, buf in mod.named_buffers(recurse=False):
            if buf is None or name in mod._non_persistent_buffers_set or id(buf) in seen:
                continue
            seen.add(id(buf))
            out.append((f"{mod_name}.{name}" if mod_name else name, buf))
    return out


def untrained_state(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Persistent buffers and frozen parameters (``requires_grad=False``): the model state no optimizer
    owns, saved whole and replicated."""
    frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    return frozen + persistent_buffers(model)


def aliases(model: nn.Module) -> dict[str, str]:
    """{other name: first name} for parameters and persistent buffers reachable under several names."""
    out: dict[str, str] = {}
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        k = id(p)
        if k in first:
            out[name] = first[k]
        else:
            first[k] = name
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for name, buf in mod.named_buffers(recurse=False):
            if buf is None or name in mod._non_persistent_buffers_set:
                continue
            full = f"{mod_name}.{name}" if mod_name else name
            k = id(buf)
            if k in first and first[k] != full:
                out[full] = first[k]
            else:
                first.setdefault(k, full)
    return out


def _broadcast_bytes(tensors: list[torch.Tensor], comm: Communicator) -> None:
    """Rank 0's bytes of ``tensors`` (any dtypes) on every rank: one broadcast of an int32 byte image."""
    tensors = [t for t in tensors if not t.is_meta]  # deferred: every rank computes the same values later
    if not tensors:
        return
    parts = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors]
    n = sum(p.numel() for p in parts)
    image = torch.zeros(-(-n // 4), dtype=torch.int32)
    flat = image.view(torch.uint8)
    o = 0
    for p in parts:
        flat[o : o + p.numel()].copy_(p)
        o += p.numel()
    comm.broadcast(image, src=0)
    o = 0
    with torch.no_grad():
        for t, p in zip(tensors, parts):
            t.copy_(flat[o : o + p.numel()].view(t.dtype).view(t.shape))
            o += p.numel()


def broadcast_buffers(model: nn.Module, comm: Communicator) -> None:
    """Every rank takes rank 0's persistent buffers. Collective over ``comm`` (a no-op without buffers)."""
    if comm.world_size > 1:
        _broadcast_bytes([b for _, b in persistent_buffers(model)], comm)


def broadcast_parameters(model: nn.Module, comm: Communicator) -> None:
    """Make every rank start from rank 0's parameters and buffers. Collective over ``comm``."""
    if comm.world_size == 1:
        return
    _broadcast_bytes(list(model.parameters()), comm)
    broadcast_buffers(model, comm)


def buffer_shards(model: nn.Module, sharded: set[str] = frozenset()) -> list[Shard]:
    """Persistent buffers and frozen parameters, whole and replicated (every rank holds rank 0's bytes),
    except the frozen parameters named in ``sharded`` (ZeRO-3 saves its own pieces of those). Local."""
    return [
        Shard(f"model.{n}", b.detach(), tuple(b.shape), full_box(b.shape), replicated=True)
        for n, b in untrained_state(model)
        if n not in sharded
    ]


@torch.no_grad()
def load_buffers(model: nn.Module, read: ShardReader, sharded: set[str] = frozenset()) -> None:
    """Fill persistent buffers and frozen parameters (but those in ``sharded``) from a checkpoint
    (read whole). Local."""
    for n, b in untrained_state(model):
        if n not in sharded:
            b.copy_(read(f"model.{n}", tuple(b.shape), full_box(b.shape), False))
