"""One rank's shard file: a plain safetensors file, written without copies and parsed defensively.

Layout (the safetensors format, so ``safetensors.safe_open`` reads it too): 8 bytes
little-endian header length N, N bytes of JSON header padded with spaces so the data
starts on a 4096-byte boundary (O_DIRECT writes from an aligned staging buffer), then
the tensors back to back, largest item size first (every tensor stays aligned to its
dtype). The parser never evaluates anything: a pickle renamed ``.safetensors`` fails the
header-length or first-byte check, and every offset is bounds- and overlap-checked.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import math
import os
import stat
import struct

import torch

from .errors import CheckpointFormatError

MAX_HEADER = 100 * 1000 * 1000  # the safetensors library's limit
ALIGN = 4096

CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
FROM_CODE = {v: k for k, v in CODES.items()}
NAMES = {d: str(d).removeprefix("torch.") for d in CODES}
FROM_NAME = {v: k for k, v in NAMES.items()}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor in a shard file; ``start``/``stop`` are absolute byte offsets in the file."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    stop: int


def itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize  # no tensor made: a layout asks twice per tensor, a peer copy lays one out every step


def layout(
    items: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]
) -> tuple[bytes, list[Entry], int]:
    """Order ``(key, dtype, shape)`` items and build the header. Returns (header bytes including
    the 8-byte length and padding, entries in file order, total file size)."""
    order = sorted(range(len(items)), key=lambda i: -itemsize(items[i][1]))
    rel, header = 0, {}
    spans = []
    for i in order:
        key, dtype, shape = items[i]
        n = math.prod(shape) * itemsize(dtype)
        header[key] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [rel, rel + n]}
        spans.append((key, dtype, tuple(shape), rel, rel + n))
        rel += n
    header["__metadata__"] = dict(metadata)
    text = json.dumps(header, separators=(",", ":")).encode()
    padded = -(-(8 + len(text)) // ALIGN) * ALIGN
    text += b" " * (padded - 8 - len(text))
    head = struct.pack("<Q", len(text)) + text
    entries = [Entry(k, d, s, padded + a, padded + b) for k, d, s, a, b in spans]
    return head, entries, padded + rel


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (any dtype, including 0-d and bf16) that keeps
    ``t`` alive. Made from the address: ``Tensor.numpy()`` would mark the caller's storage (a model's
    parameter, when a checkpoint is written without staging) non-resizable for good."""
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(b"")
    raw = (ctypes.c_uint8 * n).from_address(t.data_ptr())
    raw.owner = t
    return memoryview(raw).cast("B")


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def loads_strict(text: bytes | str, what: str) -> object:
    """json.loads that refuses duplicate keys (JSON allows them; last-wins would hide tampering)
    and nesting deep enough to exhaust the interpreter's stack."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        what_failed = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise CheckpointFormatError(f"{what}: not valid JSON ({what_failed})") from None


def shard_metadata(rank: int, step: int) -> dict[str, str]:
    """The ``__metadata__`` of rank ``rank``'s shard file of step ``step`` (the reader recomputes
    a file's exact size from the manifest with it)."""
    return {"format": "disttrain-checkpoint", "rank": str(rank), "step": str(step)}


def parse_header(head: bytes, file_size: int, where: str) -> tuple[dict[str, Entry], dict[str, str]]:
    """Validate a safetensors header. ``head`` holds at least the first 8 bytes (and the whole
    header when its length is valid). Raises CheckpointFormatError naming ``where``."""
    if file_size < 8 or len(head) < 8:
        raise CheckpointFormatError(f"{where}: {file_size} bytes is too short for a safetensors file")
    (n,) = struct.unpack("<Q", head[:8])
    if n > MAX_HEADER:
        raise CheckpointFormatError(
            f"{where}: header length {n} is over the safetensors limit of {MAX_HEADER} bytes\n"
            "HINT: this is not a safetensors file (a pickle renamed .safetensors starts like this); "
            "it was not loaded"
        )
    if 8 + n > file_size or len(head) < 8 + n:
        raise CheckpointFormatError(f"{where}: header of {n} bytes runs past the end of the {file_size}-byte file")
    text = head[8 : 8 + n]
    if not text.lstrip()[:1] == b"{":
        raise CheckpointFormatError(f"{where}: header does not start with a JSON object; not a safetensors file")
    obj = loads_strict(text, f"{where} header")
    if not isinstance(obj, dict):
        raise CheckpointFormatError(f"{where}: header is not a JSON object")
    meta = obj.pop("__metadata__", {}) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CheckpointFormatError(f"{where}: __metadata__ must map strings to strings")
    data_start, data_size = 8 + n, file_size - 8 - n
    entries: dict[str, Entry] = {}
    for key, info in obj.items():
        try:
            dtype = FROM_CODE[info["dtype"]]
            shape = tuple(info["shape"])
            a, b = info["data_offsets"]
            ok = all(isinstance(s, int) and s >= 0 for s in shape) and isinstance(a, int) and isinstance(b, int)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise CheckpointFormatError(f"{where}: tensor {key!r}: malformed entry {info!r}")
        if not 0 <= a <= b <= data_size or b - a != math.prod(shape) * itemsize(dtype):
            raise CheckpointFormatError(
                f"{where}: tensor {key!r}: data_offsets [{a}, {b}) do not fit shape "
                f"{list(shape)} {info['dtype']} in {data_size} data bytes"
            )
        entries[key] = Entry(key, dtype, shape, data_start + a, data_start + b)
    spans = sorted((e.start, e.stop, e.key) for e in entries.values() if e.stop > e.start)
    for (a0, b0, k0), (a1, b1, k1) in zip(spans, spans[1:]):
        if a1 < b0:
            raise CheckpointFormatError(f"{where}: byte ranges of {k0!r} [{a0}, {b0}) and {k1!r} [{a1}, {b1}) overlap")
    return entries, meta


_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def open_regular(name: str, where: str, *, dir_fd: int | None = None) -> tuple[int, int]:
    """Open a checkpoint file for reading: (fd, size). Refuses, without waiting and without
    following, anything that is not a regular file: a symlink (``O_NOFOLLOW``), a FIFO or
    device (``O_NONBLOCK`` so the open itself cannot block, then ``fstat``). The caller closes."""
    try:
        fd = os.open(name, _OPEN_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CheckpointFormatError(
                f"{where}: is a symbolic link, not followed (it could lead outside the checkpoint directory)"
                "\nHINT: checkpoint files must be regular files, not links; it was not read"
            ) from None
        if exc.errno == errno.ENOENT:
            raise
        raise CheckpointFormatError(f"{where}: cannot open ({exc.strerror})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a directory" if stat.S_ISDIR(st.st_mode) else "not a file"
        raise CheckpointFormatError(
            f"{where}: is {kind}, not a regular file\nHINT: checkpoint files must be regular files; it was not read"
        )
    return fd, st.st_size


def pread_into(fd: int, out: memoryview, offset: int) -> int:
    """Fill ``out`` from ``fd`` at ``offset`` (fewer bytes only at end of file); returns the count."""
    got = 0
    while got < len(out):
        n = os.preadv(fd, [out[got : got + (1 << 28)]], offset + got)
        if not n:
            break
        got += n
    return got


def read_exact(fd: int, n: int) -> bytes:
    """Up to ``n`` bytes from ``fd`` (fewer only at end of file)."""
    parts, got = [], 0
    while got < n:
        chunk = os.read(fd, min(n - got, 1 << 24))
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)
