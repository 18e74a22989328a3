"""Pretrained weights, read box by box (``model.pretrained``, ``model.pretrained_strict``).

:func:`open_pretrained` opens what ``model.pretrained`` names and returns a :class:`TensorSource`:

- a transformers directory: ``config.json`` with ``model.safetensors`` or a sharded
  ``model.safetensors.index.json`` (its ``weight_map`` says which file holds each tensor);
  ``disttrain ckpt export`` writes this form, so an export loads back here;
- a consolidated ``.safetensors`` file (``disttrain ckpt consolidate``);
- a disttrain checkpoint directory (``step_N``, or a run's checkpoint folder: its newest one),
  read through the checkpoint reader, which verifies each file it opens.

A rank asks only for the boxes it keeps (a ZeRO-3 flat range, a tensor-parallel slice, its
pipeline stages' tensors); safetensors files are memory-mapped and sliced with
``safe_open(...).get_slice``, so only the rows a box covers are read. No rank reads the whole
model and nothing is broadcast. Names are the model's ``state_dict`` names.
"""

from __future__ import annotations

import json
import math
import os
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


class SafetensorsSource:
    """One or more safetensors files; ``files`` maps each tensor name to its file."""

    def __init__(self, path: str, files: dict[str, str]):
        self.path, self._files = path, files
        self._open: dict[str, object] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}

    def _handle(self, file: str):
        from safetensors import safe_open

        if file not in self._open:
            try:
                self._open[file] = safe_open(file, framework="pt", device="cpu")
            except (OSError, ValueError, RuntimeError) as exc:
                raise PretrainedError(f"{file}: not a readable safetensors file ({exc})") from None
        return self._open[file]

    def names(self) -> set[str]:
        return set(self._files)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._shapes:
            self._shapes[name] = tuple(self._handle(self._files[name]).get_slice(name).get_shape())
        return self._shapes[name]

    def read(self, name: str, box: Box, flat: bool) -> torch.Tensor:
        sl = self._handle(self._files[name]).get_slice(name)
        shape = self.shape(name)
        if not shape:
            return self._handle(self._files[name]).get_tensor(name)
        if not flat:
            return sl[tuple(slice(a, b) for a, b in box)]
        (a, b), row = box[0], math.prod(shape[1:])
        r0, r1 = a // row, -(-b // row)  # the rows the range touches: only those are read
        rows = sl[r0:r1].reshape(-1)
        return rows[a - r0 * row : b - r0 * row]

    def close(self) -> None:
        self._open.clear()


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
    from safetensors import safe_open

    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            return {n: file for n in f.keys()}
    except (OSError, ValueError, RuntimeError) as exc:
        raise PretrainedError(f"{file}: not a readable safetensors file ({exc})") from None


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
    from ..checkpoint.reader import list_checkpoints

    found = list_checkpoints(path)
    if found:
        return CheckpointSource(found[0][1])
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
