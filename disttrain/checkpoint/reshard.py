"""Resharding: fill any box a loader asks for from whatever pieces a checkpoint holds, and say
in advance (``disttrain ckpt reshard --check --to LAYOUT``) whether a target layout can load.

A box is ``[start, stop)`` per dim of the global shape, or of ``(numel,)`` when ``flat``
(ZeRO's shards of the flattened tensor). nd-to-nd and flat-to-flat overlaps are plain
slices; mixed cases go through flat element indices of the nd box (row-major), which
costs an int64 index per element but only for the mixed case.
"""

from __future__ import annotations

import dataclasses
import math
import re

import torch

from .errors import CheckpointError
from .manifest import Box, Manifest


def box_numel(box: Box) -> int:
    return math.prod(b - a for a, b in box)


def _flat_index(box: Box, shape: tuple[int, ...]) -> torch.Tensor:
    """Row-major flat indices of every element of an nd box."""
    idx = torch.zeros(1, dtype=torch.int64)
    stride = math.prod(shape)
    for (a, b), s in zip(box, shape):
        stride //= max(s, 1)
        idx = (idx.unsqueeze(1) + torch.arange(a, b, dtype=torch.int64) * stride).reshape(-1)
    return idx


def _flat_bounds(box: Box, shape: tuple[int, ...]) -> tuple[int, int]:
    """[first, last+1) flat index of an nd box (a quick reject before building indices)."""
    if box_numel(box) == 0:
        return 0, 0
    lo = hi = 0
    stride = math.prod(shape)
    for (a, b), s in zip(box, shape):
        stride //= max(s, 1)
        lo += a * stride
        hi += (b - 1) * stride
    return lo, hi + 1


def copy_overlap(
    out: torch.Tensor,
    out_box: Box,
    out_flat: bool,
    src: torch.Tensor,
    src_box: Box,
    src_flat: bool,
    shape: tuple[int, ...],
) -> int:
    """Copy the part of ``src`` (holding ``src_box``) that falls in ``out_box`` into ``out``;
    returns the number of elements copied. Both tensors are contiguous and shaped like their box."""
    if not out_flat and not src_flat:
        if not shape:  # 0-d tensor
            out.copy_(src)
            return 1
        inter = [(max(a0, b0), min(a1, b1)) for (a0, a1), (b0, b1) in zip(out_box, src_box)]
        if any(lo >= hi for lo, hi in inter):
            return 0
        dst = tuple(slice(lo - a, hi - a) for (lo, hi), (a, _) in zip(inter, out_box))
        sl = tuple(slice(lo - a, hi - a) for (lo, hi), (a, _) in zip(inter, src_box))
        out[dst].copy_(src[sl])
        return math.prod(hi - lo for lo, hi in inter)
    if out_flat and src_flat:
        (o0, o1), (s0, s1) = out_box[0], src_box[0]
        lo, hi = max(o0, s0), min(o1, s1)
        if lo >= hi:
            return 0
        out[lo - o0 : hi - o0].copy_(src[lo - s0 : hi - s0])
        return hi - lo
    if src_flat:  # flat piece into an nd box
        (s0, s1) = src_box[0]
        lo, hi = _flat_bounds(out_box, shape)
        if max(lo, s0) >= min(hi, s1):
            return 0
        idx = _flat_index(out_box, shape) if shape else torch.zeros(1, dtype=torch.int64)
        m = (idx >= s0) & (idx < s1)
        out.view(-1)[m] = src[idx[m] - s0]
        return int(m.sum())
    (o0, o1) = out_box[0]  # nd piece into a flat box
    lo, hi = _flat_bounds(src_box, shape)
    if max(lo, o0) >= min(hi, o1):
        return 0
    idx = _flat_index(src_box, shape) if shape else torch.zeros(1, dtype=torch.int64)
    m = (idx >= o0) & (idx < o1)
    out[idx[m] - o0] = src.reshape(-1)[m]
    return int(m.sum())


# -- will a layout load? ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TargetLayout:
    strategy: str
    world_size: int
    tp: int = 1
    pp: int = 1

    def __str__(self) -> str:
        extra = "".join(f",{k}={v}" for k, v in (("tp", self.tp), ("pp", self.pp)) if v != 1)
        return f"{self.strategy}:{self.world_size}{extra}"


STRATEGIES = ("ddp", "zero1", "zero2", "zero3")


def parse_layout(text: str) -> TargetLayout:
    """``STRATEGY:WORLD[,tp=N][,pp=N]``, e.g. ``zero2:3`` or ``ddp:4,tp=2``."""
    m = re.fullmatch(r"(\w+):(\d+)((?:,(?:tp|pp)=\d+)*)", text.strip())
    if not m or m.group(1) not in STRATEGIES:
        raise CheckpointError(
            f"layout {text!r}: expected STRATEGY:WORLD[,tp=N][,pp=N] with STRATEGY one of "
            f"{', '.join(STRATEGIES)}\nHINT: e.g. --to zero2:3 or --to ddp:4,tp=2"
        )
    extra = dict(kv.split("=") for kv in m.group(3).split(",") if kv)
    return TargetLayout(m.group(1), int(m.group(2)), int(extra.get("tp", 1)), int(extra.get("pp", 1)))


BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def repeated_blocks(names) -> set[str]:
    """The largest family of numbered modules (``blocks.N``, ``transformer.h.N``, ``model.layers.N``): the
    units a pipeline splits. Returns their prefixes."""
    families: dict[str, set[str]] = {}
    for n in names:
        for m in re.finditer(r"(?:^|\.)(\d+)\.", n):
            families.setdefault(n[: m.start(1)], set()).add(n[: m.end(1)])
    return max(families.values(), key=len, default=set())


def check(manifest: Manifest, target: TargetLayout, state: dict | None = None) -> tuple[bool, list[str]]:
    """Without reading tensors: can ``target`` load this checkpoint? Returns (ok, reasons/notes)."""
    problems, notes = [], []
    w, tp, pp = target.world_size, target.tp, target.pp
    if w < 1 or tp < 1 or pp < 1 or w % (tp * pp):
        problems.append(f"world size {w} is not a multiple of tp*pp = {tp * pp}")
    model = {n[6:]: t for n, t in manifest.tensors.items() if n.startswith("model.")}
    if not model:
        problems.append("the checkpoint holds no model tensors (model.*)")
    optim = {n for n in manifest.tensors if n.startswith("optim.")}
    record = (state or {}).get("model") or {}
    if not optim:
        notes.append("no optimizer state: the optimizer would start fresh")
    else:
        # Buffers and frozen parameters have no optimizer state: only trained parameters need it.
        untrained = set(record.get("untrained") or [])
        stated = {o[6:].rsplit(".", 1)[0] for o in optim}
        if "untrained" not in record:  # a checkpoint without the record: BatchNorm statistics at least
            untrained = {n for n in model if n.endswith(BUFFER_SUFFIXES)}
        missing = [p for p in model if p not in untrained and p not in stated]
        if missing:
            problems.append(f"optimizer state missing for {len(missing)} parameters, e.g. {missing[0]}")
    cfg = ((state or {}).get("config") or {}).get("model") or {}
    hf = (record.get("transformers") or {}).get("config") or {}
    if tp > 1:
        for key in ("n_head", "num_attention_heads", "num_key_value_heads"):
            heads = cfg.get(key, hf.get(key))
            if isinstance(heads, int) and heads % tp:
                problems.append(f"tp={tp} does not divide {key}={heads}")
        for name, t in model.items():
            if re.search(r"(attn\.qkv|mlp\.fc)\.(weight|bias)$", name) and t.shape[0] % tp:
                problems.append(f"tp={tp} does not divide dim 0 ({t.shape[0]}) of {name} (column parallel)")
            if re.search(r"(attn\.proj|mlp\.proj)\.weight$", name) and t.shape[1] % tp:
                problems.append(f"tp={tp} does not divide dim 1 ({t.shape[1]}) of {name} (row parallel)")
        if not cfg.get("n_head") and not hf:
            notes.append(f"tp={tp}: your model's plan is checked against its widths when the job starts")
    if pp > 1:
        blocks = repeated_blocks(model)
        if len(blocks) < pp:
            problems.append(f"pp={pp} stages but the model has {len(blocks)} repeated blocks")
    dp = w // max(tp * pp, 1)
    batch = (((state or {}).get("config") or {}).get("train") or {}).get("batch_size")
    if batch is not None and batch < dp:
        notes.append(f"global batch {batch} < {dp} data-parallel ranks: some ranks get empty micro-batches")
    if manifest.world_size != w:
        notes.append(
            f"saved on {manifest.world_size} ranks, loading on {w}: RNG streams of ranks >= "
            f"{manifest.world_size} are re-seeded; data position (step {manifest.step}) carries over"
        )
    return not problems, problems + notes
