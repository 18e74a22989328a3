"""The manifest: the one JSON file that makes a checkpoint directory a checkpoint.

Written last (its presence inside a renamed ``step_*`` directory is the commit). It
holds the format version, the world size and parallel layout that wrote it, a checksum
per file, and for every logical tensor its global shape, dtype and the pieces that tile
it: which byte range of which file holds which box (``flat`` boxes index the tensor
flattened to 1-D, as ZeRO shards do). :func:`validate` refuses anything malformed
before a byte of tensor data is read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

from . import checksum
from .errors import CheckpointFormatError
from .shardfile import FROM_NAME, itemsize, layout, loads_strict, shard_metadata

FORMAT = "disttrain-checkpoint"
VERSION = 1
NAME = "manifest.json"
STATE = "state.json"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}$")
# What a reader accepts before it parses: a manifest of 64 MiB holds about 400,000 pieces,
# e.g. 400 tensors sharded over 1,024 ranks. Both are read before anything is allocated.
MAX_BYTES = 256 << 20
MAX_PIECES = 4 << 20
MAX_NDIM = 64
MAX_OVERLAP_CHECKS = 20_000_000  # box pairs compared per tensor before the manifest counts as hostile
# state.json (and any file that holds no tensor) is read whole and parsed: a base of 16 MiB for the
# resolved config and model record, plus 256 KiB per saved rank for its RNG streams.
STATE_BASE_BYTES = 16 << 20
STATE_BYTES_PER_RANK = 256 << 10
SHARD_SUFFIX = ".safetensors"
# Errors a hostile file can provoke in parsing or checking code that was not written to raise them.
BAD_INPUT = (
    RecursionError,
    TypeError,
    ValueError,
    KeyError,
    IndexError,
    AttributeError,
    OverflowError,
    MemoryError,
    UnicodeError,
)

Box = tuple[tuple[int, int], ...]


@dataclasses.dataclass(frozen=True)
class Piece:
    file: str
    key: str  # the tensor's key inside the safetensors file
    start: int  # absolute byte offsets in the file
    stop: int
    box: Box
    flat: bool


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str
    pieces: tuple[Piece, ...]


@dataclasses.dataclass
class Manifest:
    step: int
    world_size: int
    layout: dict
    files: dict[str, dict]  # name -> {"rank", "size", "checksum"}
    tensors: dict[str, TensorInfo]

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "format": FORMAT,
                "version": VERSION,
                "step": self.step,
                "world_size": self.world_size,
                "layout": self.layout,
                "checksum": checksum.ALGORITHM,
                "files": self.files,
                "tensors": {
                    n: {
                        "shape": list(t.shape),
                        "dtype": t.dtype,
                        "pieces": [
                            {
                                "file": p.file,
                                "key": p.key,
                                "start": p.start,
                                "stop": p.stop,
                                "box": [list(b) for b in p.box],
                                "flat": p.flat,
                            }
                            for p in t.pieces
                        ],
                    }
                    for n, t in self.tensors.items()
                },
            },
            separators=(",", ":"),
        ).encode()

    def nbytes(self) -> int:
        return sum(f["size"] for f in self.files.values())


def safe_file_name(name: object, where: str) -> str:
    """A manifest path must be a plain file name inside the checkpoint directory."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or name in (".", ".."):
        raise CheckpointFormatError(
            f"{where}: file path {name!r} leaves the checkpoint directory or is not a "
            "plain file name\nHINT: manifests list files by bare name; it was not opened"
        )
    return name


def _int(v, what: str, where: str, lo: int = 0) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise CheckpointFormatError(f"{where}: {what} must be an integer >= {lo}, got {v!r}")
    return v


def parse(text: bytes, where: str) -> Manifest:
    """Parse and validate a manifest. Whatever is wrong with it raises CheckpointFormatError naming
    ``where`` (a loader then falls back), never another exception type."""
    try:
        return _parse(text, where)
    except CheckpointFormatError:
        raise
    except BAD_INPUT as exc:
        raise CheckpointFormatError(
            f"{where}: malformed manifest ({type(exc).__name__}: {str(exc)[:200]})\nHINT: not a manifest "
            "disttrain writes; it was not loaded"
        ) from None


def _parse(text: bytes, where: str) -> Manifest:
    obj = loads_strict(text, where)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointFormatError(f"{where}: not a {FORMAT} manifest")
    if obj.get("version") != VERSION:
        raise CheckpointFormatError(
            f"{where}: format version {obj.get('version')!r}, this reader knows {VERSION}"
            "\nHINT: read it with the disttrain version that wrote it"
        )
    if obj.get("checksum") != checksum.ALGORITHM:
        raise CheckpointFormatError(f"{where}: checksum algorithm {obj.get('checksum')!r} is unknown")
    if not isinstance(obj.get("tensors") or {}, dict) or not isinstance(obj.get("files") or {}, dict):
        raise CheckpointFormatError(f"{where}: 'files' and 'tensors' must be JSON objects")
    n_pieces = sum(
        len(t["pieces"])
        for t in (obj.get("tensors") or {}).values()
        if isinstance(t, dict) and isinstance(t.get("pieces"), list)
    )
    if n_pieces > MAX_PIECES:
        raise CheckpointFormatError(
            f"{where}: {n_pieces} pieces, over the limit of {MAX_PIECES}\nHINT: not a manifest disttrain "
            "writes; it was not loaded"
        )
    files: dict[str, dict] = {}
    for name, info in (obj.get("files") or {}).items():
        safe_file_name(name, where)
        if not isinstance(info, dict) or not isinstance(info.get("checksum"), str):
            raise CheckpointFormatError(f"{where}: file {name!r}: malformed entry {info!r}")
        files[name] = {
            "rank": _int(info.get("rank"), f"{name} rank", where),
            "size": _int(info.get("size"), f"{name} size", where),
            "checksum": info["checksum"],
        }
    tensors: dict[str, TensorInfo] = {}
    for tname, t in (obj.get("tensors") or {}).items():
        w = f"{where}: tensor {tname!r}"
        if not isinstance(t, dict) or t.get("dtype") not in FROM_NAME or not isinstance(t.get("shape"), list):
            raise CheckpointFormatError(f"{w}: malformed entry")
        if len(t["shape"]) > MAX_NDIM:
            raise CheckpointFormatError(f"{w}: {len(t['shape'])} dimensions, over the limit of {MAX_NDIM}")
        shape = tuple(_int(s, "shape", w) for s in t["shape"])
        pieces = []
        for p in t.get("pieces") or []:
            try:
                box = tuple((_int(a, "box", w), _int(b, "box", w)) for a, b in p["box"])
                piece = Piece(
                    safe_file_name(p["file"], w),
                    str(p["key"]),
                    _int(p["start"], "start", w),
                    _int(p["stop"], "stop", w),
                    box,
                    bool(p["flat"]),
                )
            except (KeyError, TypeError, ValueError):
                raise CheckpointFormatError(f"{w}: malformed piece {p!r}") from None
            if piece.file not in files:
                raise CheckpointFormatError(f"{w}: piece in {piece.file!r}, which the manifest does not list")
            if not piece.file.endswith(SHARD_SUFFIX):
                raise CheckpointFormatError(f"{w}: piece in {piece.file!r}, which is not a {SHARD_SUFFIX} file")
            pieces.append(piece)
        tensors[tname] = TensorInfo(shape, t["dtype"], tuple(pieces))
    world = _int(obj.get("world_size"), "world_size", where, 1)
    state_cap = STATE_BASE_BYTES + STATE_BYTES_PER_RANK * min(world, MAX_PIECES)
    for name, info in files.items():
        if not name.endswith(SHARD_SUFFIX) and info["size"] > state_cap:
            raise CheckpointFormatError(
                f"{where}: {name} declared as {info['size']} bytes, over the limit of {state_cap} for a "
                f"file without tensors of a {world}-rank checkpoint\nHINT: not a checkpoint disttrain writes; "
                "it was not read"
            )
    if not isinstance(obj.get("layout") or {}, dict):
        raise CheckpointFormatError(f"{where}: 'layout' must be a JSON object")
    m = Manifest(
        _int(obj.get("step"), "step", where),
        world,
        obj.get("layout") or {},
        files,
        tensors,
    )
    validate(m, where)
    check_shard_sizes(m, where)
    return m


def check_shard_sizes(m: Manifest, where: str) -> None:
    """Each shard file's declared size is exactly what the writer lays out for its pieces: the
    header (rebuilt from keys, dtypes, piece shapes, rank and step) plus the pieces back to
    back, at the offsets the manifest gives. So no file can declare a byte the manifest's tensors
    do not account for, and a reader's memory is bounded by the tensors it asked for."""
    per_file: dict[str, list[tuple[Piece, str]]] = {f: [] for f in m.files if f.endswith(SHARD_SUFFIX)}
    for t in m.tensors.values():
        for p in t.pieces:
            per_file[p.file].append((p, t.dtype))
    for f, pieces in per_file.items():
        pieces.sort(key=lambda pd: (pd[0].start, pd[0].stop))
        items = [
            (p.key, FROM_NAME[dt], (math.prod(b - a for a, b in p.box),) if p.flat else tuple(b - a for a, b in p.box))
            for p, dt in pieces
        ]
        _, entries, size = layout(items, shard_metadata(m.files[f]["rank"], m.step))
        declared = m.files[f]["size"]
        placed = sorted((e.start, e.stop, e.key) for e in entries)
        wanted = [(p.start, p.stop, p.key) for p, _ in pieces]
        if size != declared or placed != wanted:
            raise CheckpointFormatError(
                f"{where}: {f} declared as {declared} bytes, but its {len(pieces)} piece(s) and header make "
                f"{size} bytes laid out as the writer does\nHINT: not a checkpoint disttrain writes; it was not read"
            )


def _check_disjoint(boxes: list[Box], w: str) -> None:
    """No two boxes overlap: a sweep along the axis with the most distinct starts, so grid
    tilings cost n log n; a crafted manifest that still needs too many comparisons is refused."""
    if len(boxes) < 2:
        return
    ndim = len(boxes[0])
    axis = max(range(ndim), key=lambda d: len({b[d][0] for b in boxes}))
    order = sorted((b for b in boxes if all(lo < hi for lo, hi in b)), key=lambda b: b[axis][0])
    active: list[Box] = []
    budget = MAX_OVERLAP_CHECKS
    for b in order:
        active = [a for a in active if a[axis][1] > b[axis][0]]
        budget -= len(active)
        if budget < 0:
            raise CheckpointFormatError(f"{w}: {len(boxes)} pieces too costly to check for overlaps; not loaded")
        for a in active:
            if all(max(x0, y0) < min(x1, y1) for (x0, x1), (y0, y1) in zip(a, b)):
                raise CheckpointFormatError(f"{w}: boxes {list(map(list, a))} and {list(map(list, b))} overlap")
        active.append(b)


def validate(m: Manifest, where: str) -> None:
    """Boxes inside their tensors, byte ranges sized right and disjoint, pieces tiling each tensor."""
    by_file: dict[str, list] = {}
    for name, t in m.tensors.items():
        w = f"{where}: tensor {name!r}"
        total = math.prod(t.shape)
        isz = itemsize(FROM_NAME[t.dtype])
        covered = 0
        nd, flat = [], []
        for p in t.pieces:
            bounds = (total,) if p.flat else t.shape
            if len(p.box) != len(bounds) or any(not 0 <= a <= b <= s for (a, b), s in zip(p.box, bounds)):
                raise CheckpointFormatError(f"{w}: box {list(map(list, p.box))} is outside shape {list(bounds)}")
            n = math.prod(b - a for a, b in p.box)
            if p.stop - p.start != n * isz or p.start > p.stop:
                raise CheckpointFormatError(
                    f"{w}: byte range [{p.start}, {p.stop}) in {p.file} does not hold {n} elements of {t.dtype}"
                )
            covered += n
            (flat if p.flat else nd).append(p.box)
            if p.stop > p.start:
                by_file.setdefault(p.file, []).append((p.start, p.stop, name))
        if math.prod(t.shape):
            _check_disjoint(nd, w)
        fl = sorted(b[0] for b in flat)
        for (a0, b0), (a1, _) in zip(fl, fl[1:]):
            if a1 < b0:
                raise CheckpointFormatError(f"{w}: flat ranges [{a0}, {b0}) and [{a1}, ...) overlap")
        if covered != total:
            raise CheckpointFormatError(f"{w}: pieces cover {covered} of {total} elements")
    for f, spans in by_file.items():
        spans.sort()
        for (a0, b0, n0), (a1, b1, n1) in zip(spans, spans[1:]):
            if a1 < b0:
                raise CheckpointFormatError(
                    f"{where}: {f}: byte ranges of {n0!r} [{a0}, {b0}) and {n1!r} [{a1}, {b1}) overlap"
                )
