"""Activations between pipeline stages: any nesting of tuples, lists and dicts of tensors
(any shape and dtype) and plain values, sent as a small header and then the tensors.

Wire format of one message over the pp Communicator, all with the same tag:
``int64[1]`` header length, ``uint8[n]`` header (JSON: the structure, with each tensor as
``{"t": index, "dtype", "shape", "grad"}``, version ``v: 1``), then each tensor in order.
The receiver allocates exactly what the header describes, so stages need not agree on
shapes in advance (sequence lengths, batch sizes and dtypes may change from step to step).
"""

from __future__ import annotations

import json

import torch

from collectives import Communicator
from collectives.objects import from_words, tensor_as_words, tensor_from_words, to_words, words_buffer

from ..mesh import MeshError
from ..tensor.vocab import VocabShard, mark_vocab_shard, vocab_shard

VERSION = 1
MAX_HEADER = 1 << 20
# Dtypes every communicator backend moves; others (bool, uint8, int8, int16, ...) travel as their bytes.
NATIVE = {torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int32, torch.int64}


def _to_wire(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous()
    return t if t.dtype in NATIVE else tensor_as_words(t)


def _device(group: Communicator) -> torch.device:
    """Where ``group`` moves tensors (the backend's declared device; None is the CPU): activations arrive there."""
    return torch.device(group.backend.device or "cpu")


def _wire_buffer(shape: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if dtype in NATIVE:
        return torch.empty(shape, dtype=dtype, device=device)
    return words_buffer(shape, dtype, device)


def _from_wire(buf: torch.Tensor, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    return buf if dtype in NATIVE else tensor_from_words(buf, shape, dtype)


def _header(meta: dict) -> tuple[torch.Tensor, int]:
    words = to_words(json.dumps(meta).encode(), fill=b" ")  # JSON ignores trailing blanks
    return words, 4 * words.numel()


def _parse(header: torch.Tensor) -> dict:
    return json.loads(from_words(header).decode())


def _spec(obj, tensors: list) -> object:
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        s = {"t": len(tensors) - 1, "dtype": str(obj.dtype).removeprefix("torch."), "shape": list(obj.shape)}
        s["grad"] = bool(obj.requires_grad and obj.is_floating_point())
        vs = vocab_shard(obj)
        if vs is not None:
            s["vocab"] = [vs.start, vs.vocab]
        return s
    if isinstance(obj, tuple | list):
        return {"seq": [_spec(x, tensors) for x in obj], "tuple": isinstance(obj, tuple)}
    if isinstance(obj, dict):
        return {"dict": [[k, _spec(v, tensors)] for k, v in obj.items()]}
    if obj is None or isinstance(obj, bool | int | float | str):
        return {"v": obj}
    raise MeshError(
        f"pipeline: a stage returned a {type(obj).__name__}, which cannot travel between stages"
        "\nHINT: return tensors, or tuples/lists/dicts of them (a stage_forward target can convert)"
    )


def flatten(obj) -> tuple[object, list[torch.Tensor]]:
    """(structure, tensors in order)."""
    tensors: list[torch.Tensor] = []
    return _spec(obj, tensors), tensors


def _build(spec, tensors: list, tp_group: Communicator | None):
    if "t" in spec:
        t = tensors[spec["t"]]
        if "vocab" in spec and tp_group is not None:
            mark_vocab_shard(t, VocabShard(tp_group, spec["vocab"][0], spec["vocab"][1]))
        return t
    if "seq" in spec:
        items = [_build(x, tensors, tp_group) for x in spec["seq"]]
        return tuple(items) if spec["tuple"] else items
    if "dict" in spec:
        return {k: _build(v, tensors, tp_group) for k, v in spec["dict"]}
    return spec["v"]


def _leaves(spec) -> list[dict]:
    """The tensor entries of a header's structure, in tensor order."""
    out: list[dict] = []

    def walk(x):
        if "t" in x:
            out.append(x)
        for y in x.get("seq", []):
            walk(y)
        for _, y in x.get("dict", []):
            walk(y)

    walk(spec)
    return sorted(out, key=lambda s: s["t"])


def grad_leaves(obj) -> list[torch.Tensor]:
    """The floating tensors of ``obj`` that need a gradient, in wire order."""
    return [t for t in flatten(obj)[1] if t.requires_grad and t.is_floating_point()]


def send(group: Communicator, obj, dst: int, tag: int) -> list:
    """Asynchronous: returns the pending Works (wait on them before reusing the tensors)."""
    spec, tensors = flatten(obj)
    header, n = _header({"v": VERSION, "spec": spec})
    dev = _device(group)
    works = [group.send(torch.tensor([n], dtype=torch.int64, device=dev), dst, tag, async_op=True)]
    works.append(group.send(header.to(dev), dst, tag, async_op=True))
    for t in tensors:
        works.append(group.send(_to_wire(t), dst, tag, async_op=True))
    return works


def recv(group: Communicator, src: int, tag: int, tp_group: Communicator | None = None):
    """Blocking: the object ``send`` sent, its gradient-needing tensors marked requires_grad."""
    dev = _device(group)
    n = torch.zeros(1, dtype=torch.int64, device=dev)
    group.recv(n, src, tag)
    if not 0 < int(n) <= MAX_HEADER or int(n) % 4:
        raise MeshError(
            f"pipeline: header of {int(n)} bytes from stage rank {src} (tag {tag}); expected a multiple of 4 "
            f"up to {MAX_HEADER}"
        )
    header = torch.empty(int(n) // 4, dtype=torch.int32, device=dev)
    group.recv(header, src, tag)
    meta = _parse(header)
    if meta.get("v") != VERSION:
        raise MeshError(f"pipeline: wire version {meta.get('v')} from stage rank {src}; this build reads {VERSION}")
    tensors = []
    for leaf in _leaves(meta["spec"]):
        dtype = getattr(torch, leaf["dtype"])
        buf = _wire_buffer(leaf["shape"], dtype, dev)
        group.recv(buf, src, tag)
        tensors.append(_from_wire(buf, leaf["shape"], dtype).requires_grad_(leaf["grad"]))
    return _build(meta["spec"], tensors, tp_group)


def broadcast(group: Communicator, obj, src: int, tp_group: Communicator | None = None):
    """Collective over ``group``: ``src``'s object (detached) on every rank."""
    dev = _device(group)
    if group.rank == src:
        spec, tensors = flatten(obj)
        header, n = _header({"v": VERSION, "spec": spec})
        header = header.to(dev)
        size = torch.tensor([n], dtype=torch.int64, device=dev)
    else:
        size = torch.zeros(1, dtype=torch.int64, device=dev)
    group.broadcast(size, src=src)
    if group.rank != src:
        header = torch.empty(int(size) // 4, dtype=torch.int32, device=dev)
    group.broadcast(header, src=src)
    meta = _parse(header)
    out = []
    for i, leaf in enumerate(_leaves(meta["spec"])):
        dtype = getattr(torch, leaf["dtype"])
        buf = _to_wire(tensors[i]).clone() if group.rank == src else _wire_buffer(leaf["shape"], dtype, dev)
        group.broadcast(buf, src=src)
        out.append(_from_wire(buf, leaf["shape"], dtype))
    return _build(meta["spec"], out, tp_group)
