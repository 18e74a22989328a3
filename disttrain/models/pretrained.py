"""Pretrained weights, read box by box (``model.pretrained``, ``model.pretrained_strict``).

:func:`open_pretrained` opens what ``model.pretrained`` names and returns a :class:`TensorSource`:

- a transformers directory: ``config.json`` with ``model.safetensors`` or a sharded
  ``model.safetensors.index.json`` (its ``weight_map`` says which file holds each tensor);
  ``disttrain ckpt export`` writes this form, so an export loads back here;
- a consolidated ``.safetensors`` file (``disttrain ckpt consolidate``);
- a disttrain checkpoint: a ``step_N`` directory, or a run directory or its ``checkpoints/`` folder
  (the newest committed checkpoint, the ``latest`` pointer's first), read through the checkpoint
  reader, which verifies each file it opens.

A rank asks only for the boxes it keeps (a ZeRO-3 flat range, a tensor-parallel slice, its
pipeline stages' tensors); safetensors files are read with ``os.pread`` at the byte offsets
their header gives (as ``safe_open(...).get_slice`` would slice them, without memory-mapping the
file), so only the bytes of a flat range, or the rows a box spans, are read. No rank reads the whole
model and nothing is broadcast. Names are the model's ``state_dict`` names.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Protocol

import torch

from ..errors import DisttrainError


class PretrainedError(DisttrainError):
    """``model.pretrained`` cannot be read, or does not fit the model."""


Box = tuple[tuple[int, int], ...]


class TensorSource(Protocol):
    path: str

    def names(self) -> set[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str, box: Box, flat: bool) -> torch.Tensor:
        """The ``box`` of tensor ``name`` (``flat``: a [start, stop) range of it flattened)."""
        ...

    def close(self) -> None: ...


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER = 100 << 20


class SafetensorsSource:
    """One or more safetensors files; ``files`` maps each tensor name to its file. Each read is an
    ``os.pread`` of the byte range a box needs (the header's ``data_offsets``): a flat range reads
    exactly its bytes, a box the rows its first dimension spans. Nothing is memory-mapped, so what
    a rank has read is what it holds."""

    def __init__(self, path: str, files: dict[str, str]):
        self.path, self._files = path, files
        self._fds: dict[str, int] = {}
        self._headers: dict[str, tuple[int, dict]] = {}

    def _header(self, file: str) -> tuple[int, dict]:
        if file not in self._headers:
            try:
                fd = self._fds[file] = os.open(file, os.O_RDONLY | os.O_NOFOLLOW)
                (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
                if n > MAX_HEADER or n > os.fstat(fd).st_size:
                    raise ValueError(f"header of {n} bytes")
                header = json.loads(os.pread(fd, n, 8))
            except (OSError, ValueError, struct.error) as exc:
                raise PretrainedError(f"{file}: not a readable safetensors file ({exc})") from None
            header.pop("__metadata__", None)
            self._headers[file] = (8 + n, header)
        return self._headers[file]

    def _info(self, name: str) -> tuple[int, int, torch.dtype, tuple[int, ...], str]:
        file = self._files[name]
        base, header = self._header(file)
        try:
            info = header[name]
            dtype = _DTYPES[info["dtype"]]
            begin, end = (int(x) for x in info["data_offsets"])
            shape = tuple(int(d) for d in info["shape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise PretrainedError(f"{file}: tensor {name!r} is not described by its header ({exc})") from None
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise PretrainedError(f"{file}: tensor {name!r}: {end - begin} bytes for shape {list(shape)}")
        return base + begin, base + end, dtype, shape, file

    def _bytes(self, file: str, start: int, count: int) -> bytearray:
        buf = bytearray(count)
        view, done = memoryview(buf), 0
        while done < count:
            got = os.preadv(self._fds[file], [view[done:]], start + done)
            if got <= 0:
                raise PretrainedError(f"{file}: ends before byte {start + count}")
            done += got
        return buf

    def names(self) -> set[str]:
        return set(self._files)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info(name)[3]

    def read(self, name: str, box: Box, flat: bool) -> torch.Tensor:
        start, _, dtype, shape, file = self._info(name)
        item = dtype.itemsize
        if not shape:
            return torch.frombuffer(self._bytes(file, start, item), dtype=dtype).reshape(())
        if flat:
            (a, b) = box[0]
            return torch.frombuffer(self._bytes(file, start + a * item, (b - a) * item), dtype=dtype)
        row = math.prod(shape[1:])
        r0, r1 = box[0]  # the rows of the first dimension the box spans: only those are read
        rows = torch.frombuffer(self._bytes(file, start + r0 * row * item, (r1 - r0) * row * item), dtype=dtype)
        out = rows.view(r1 - r0, *shape[1:])
        return out[(slice(None), *(slice(a, b) for a, b in box[1:]))]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class CheckpointSource:
    """A disttrain checkpoint: tensors ``model.<name>``, read through its verifying reader."""

    def __init__(self, path: str):
        from ..checkpoint.reader import CheckpointReader

        self.path = path
        self._reader = CheckpointReader(path)
        self._names = {n[len("model.") :] for n in self._reader.names if n.startswith("model.")}

    def names(self) -> set[str]:
        return set(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._reader.shape(f"model.{name}"))

    def read(self, name: str, box: Box, flat: bool) -> torch.Tensor:
        return self._reader(f"model.{name}", self.shape(name), box, flat)

    def close(self) -> None:
        self._reader.release()


def _index_files(path: str) -> dict[str, str]:
    index = os.path.join(path, "model.safetensors.index.json")
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PretrainedError(f"{index}: not a safetensors index ({exc})") from None
    out = {}
    for name, file in weight_map.items():
        if not isinstance(file, str) or os.path.basename(file) != file:
            raise PretrainedError(f"{index}: weight_map[{name!r}] = {file!r} is not a file name in {path}")
        out[name] = os.path.join(path, file)
    return out


def _single_files(file: str) -> dict[str, str]:
    src = SafetensorsSource(file, {})
    try:
        return {n: file for n in src._header(file)[1]}
    finally:
        src.close()


def open_pretrained(path: str) -> TensorSource:
    """The source ``model.pretrained`` names (see the module docstring). Local; reads headers only."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise PretrainedError(
                f"model.pretrained: {path} is not a .safetensors file\nHINT: give a transformers directory "
                "(config.json + model.safetensors), a .safetensors file, or a disttrain checkpoint directory"
            )
        return SafetensorsSource(path, _single_files(path))
    if not os.path.isdir(path):
        raise PretrainedError(f"model.pretrained: {path} does not exist")
    if os.path.exists(os.path.join(path, "model.safetensors.index.json")):
        return SafetensorsSource(path, _index_files(path))
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return SafetensorsSource(path, _single_files(os.path.join(path, "model.safetensors")))
    if os.path.exists(os.path.join(path, "manifest.json")):
        return CheckpointSource(path)
    from ..checkpoint.reader import resolve

    found = resolve(path)  # a run directory or its checkpoints/ folder: the newest committed checkpoint
    if found:
        return CheckpointSource(found[0])
    raise PretrainedError(
        f"model.pretrained: {path} holds no model.safetensors, model.safetensors.index.json or disttrain "
        "checkpoint\nHINT: save with model.save_pretrained(DIR) or `disttrain ckpt export`"
    )


def match(source: TensorSource, wanted: dict[str, tuple[int, ...]], aliases: dict[str, list[str]], strict: bool):
    """Which source name fills each wanted tensor. ``wanted``: first name -> shape; ``aliases``: first
    name -> every name of that tensor (tied weights: any one present in the source fills it). Raises
    :class:`PretrainedError` naming missing, unexpected and mis-shaped keys when ``strict``; otherwise
    returns them for the caller to list. Returns ({first name: source name}, problems)."""
    have = source.names()
    found, missing, bad = {}, [], []
    used: set[str] = set()
    for name, shape in wanted.items():
        hit = next((n for n in aliases.get(name, [name]) if n in have), None)
        if hit is None:
            missing.append(name)
            continue
        used.update(n for n in aliases.get(name, [name]) if n in have)
        got = source.shape(hit)
        if tuple(got) != tuple(shape):
            bad.append(f"{hit}: shape {list(got)} in the file, the model has {list(shape)}")
            continue
        found[name] = hit
    unexpected = sorted(have - used)
    problems = [f"missing key {n!r}" for n in missing] + [f"unexpected key {n!r}" for n in unexpected] + bad
    if problems and strict:
        raise PretrainedError(
            f"model.pretrained: {source.path} does not fit the model: "
            + "; ".join(problems[:8])
            + (f" (and {len(problems) - 8} more)" if len(problems) > 8 else "")
            + "\nHINT: set model.pretrained_strict: false to load what fits (the rest keeps its initialisation)"
        )
    return found, problems
