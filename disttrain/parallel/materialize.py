"""Giving a deferred model its values, rank by rank: only what this rank keeps.

``build_strategy`` calls :func:`maybe_materialize` for a model whose values are pending
(:func:`disttrain.models.deferred.pending`: built on the meta device, and/or given
``model.pretrained``). Data parallel and ZeRO-1/2 keep every parameter on every rank, so the model is
materialised whole before the strategy wraps it. ZeRO-3 and tensor/pipeline parallel are built on the
meta model first; then the strategy's own checkpoint view (``state_shards()``: the box of each logical
tensor this rank holds, as a view of its storage) says where each value goes:

- a ZeRO-3 rank keeps the flat range of each parameter its shard covers;
- a tensor-parallel rank keeps its slice (its local parameters are allocated here, empty);
- a pipeline rank keeps its stages' tensors (the others were dropped with their modules);
- what a strategy keeps whole and replicated (buffers, rotary tables, frozen parameters outside the
  ZeRO units) becomes a real tensor in place (:func:`become`), so every alias sees it.

Values come from the recording's replay (random initialisation equal to an eager build on the same
seed), then from ``model.pretrained`` box by box for every tensor the file holds (those are not
computed). Every rank computes or reads the same bytes, so nothing is broadcast.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from ..errors import DisttrainError
from .strategy import Strategy

log = logging.getLogger(__name__)


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def become(t: torch.Tensor, value: torch.Tensor) -> None:
    """Make ``t`` (a meta parameter or buffer) hold ``value``, keeping its identity, its attributes
    and every reference to it (optimizer groups, aliases, tied names). Local."""
    new = nn.Parameter(value, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else value
    if t.__dict__:
        new.__dict__.update(t.__dict__)
    torch.utils.swap_tensors(t, new)


def _cut(t: torch.Tensor, box, flat: bool) -> torch.Tensor:
    if flat:
        (a, b) = box[0]
        return t.reshape(-1)[a:b]
    return t[tuple(slice(a, b) for a, b in box)]


def _live_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer object reachable from ``module`` (each once)."""
    out, seen = [], set()
    for m in module.modules():
        for t in [*m._parameters.values(), *m._buffers.values()]:
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                out.append(t)
    return out


def maybe_materialize(model: nn.Module, strategy: Strategy | None, device: str) -> None:
    """Give ``model`` (wrapped by ``strategy``, or None: kept whole) its pending values; a no-op for
    a model built eagerly without ``model.pretrained``. Every rank; local, no communication."""
    from ..models.deferred import forget, pending
    from ..models.pretrained import match, open_pretrained

    job = pending(model)
    if job is None:
        return
    forget(model)
    rec = job.recording
    roots = set(rec.names) if rec is not None else set()
    live = _live_tensors(strategy.model if strategy is not None else model)
    with torch.no_grad():
        for t in live:  # a strategy's own local tensors (tensor-parallel slices): allocated, filled below
            if t.is_meta and _key(t) not in roots:
                become(t, torch.zeros(t.shape, dtype=t.dtype, device=device))
    whole: dict[int, list[torch.Tensor]] = {}
    for t in live:
        if t.is_meta:
            whole.setdefault(_key(t), []).append(t)
    targets: dict[str, list[tuple[torch.Tensor, tuple, bool]]] = {}
    if strategy is not None:
        for s in strategy.state_shards():
            if s.name.startswith("model.") and not s.tensor.is_meta:
                targets.setdefault(s.name[len("model.") :], []).append((s.tensor, s.box, s.flat))
    elif rec is None:  # an eager model whole: its own tensors are the targets
        for n, t in model.state_dict(keep_vars=True).items():
            targets.setdefault(n, []).append((t, tuple((0, d) for d in t.shape), False))

    source = open_pretrained(job.pretrained) if job.pretrained else None
    found: dict[str, str] = {}
    if source is not None:
        found, problems = match(source, job.shapes, job.state, job.strict)
        for p in problems:
            log.warning("model.pretrained %s: %s (kept as initialised)", source.path, p)
    loaded = {n for first in found for n in job.state[first]}

    def place(names: list[str], key: int | None, value_of) -> None:
        """Copy each target box of ``names`` out of ``value_of(name)``; hand whole tensors their value."""
        for n in names:
            for dest, box, flat in targets.get(n, []):
                dest.copy_(value_of(n, box, flat))
        for t in whole.pop(key, []) if key is not None else []:
            become(t, value_of(None, None, None, t).to(device))

    if rec is not None:
        with torch.no_grad():

            def sink(key: int, value: torch.Tensor) -> None:
                names = rec.names[key]

                def value_of(n, box, flat, t=None):
                    if t is not None:
                        return value.view(t.dtype).as_strided(t.shape, t.stride(), t.storage_offset())
                    return _cut(rec.view(n, value), box, flat)

                place(names, key, value_of)

            rec.replay(sink, skip=loaded)
    if source is not None:
        with torch.no_grad():
            for first, hit in found.items():
                names = job.state[first]
                key = rec.key_of(first) if rec is not None else None

                def value_of(n, box, flat, t=None, hit=hit):
                    if t is not None:
                        return source.read(hit, tuple((0, d) for d in t.shape), False).to(t.dtype)
                    return source.read(hit, box, flat)

                place(names, key, value_of)
        source.close()
        log.info("model.pretrained: %d tensors from %s", len(found), source.path)
    left = [t for t in _live_tensors(strategy.model if strategy is not None else model) if t.is_meta]
    if left:
        names = {id(t): n for n, t in [*model.named_parameters(), *model.named_buffers()]}
        raise DisttrainError(
            f"deferred initialisation left {len(left)} tensors without values (e.g. "
            f"{names.get(id(left[0]), tuple(left[0].shape))})\nHINT: set model.deferred_init: false"
        )
