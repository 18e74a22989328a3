"""Reading a checkpoint: verify, then serve boxes. Local to one rank; no communication.

Order of trust: the manifest is parsed and validated first (its size and piece count
capped before parsing; paths, boxes, byte ranges, and each shard's size recomputed from
its pieces); a file's size is compared with the manifest before a byte is read, then its
xxh3 checksum is computed over fixed-size chunks, then its safetensors header is parsed
and cross-checked against the manifest, and only then are the byte ranges of the pieces a
caller asks for read (``pread``; never a whole shard) and handed out. Whatever a hostile
file provokes (deep JSON nesting, wrong types, impossible shapes) is a
:class:`CheckpointFormatError`, so a loader falls back past it. Every file is opened relative to the
checkpoint directory with ``O_NOFOLLOW | O_NONBLOCK`` and must be a regular file: a
symlink, FIFO or device planted in a checkpoint is refused at once, never followed or
waited on. Nothing here unpickles or evaluates anything.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat

import torch

from . import checksum
from . import manifest as manifest_mod
from . import state as state_mod
from .errors import CheckpointCorruptError, CheckpointError, CheckpointFormatError, CheckpointMismatchError
from .manifest import BAD_INPUT, NAME, STATE, Manifest, parse, safe_file_name
from .reshard import box_numel, copy_overlap
from .shardfile import FROM_NAME, MAX_HEADER, loads_strict, open_regular, parse_header, pread_into, read_exact

log = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step_(\d+)$")
LATEST = "latest"
_CHUNK = 16 << 20  # checksums are computed over chunks of this size


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def list_checkpoints(ckpt_dir: str) -> list[tuple[int, str]]:
    """Committed checkpoints (renamed ``step_*`` directories with a manifest), newest first."""
    try:
        names = os.listdir(ckpt_dir)
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        m = STEP_DIR.match(n)
        if m and _is_real(os.path.join(ckpt_dir, n), stat.S_ISDIR) and _is_real(os.path.join(ckpt_dir, n, NAME)):
            out.append((int(m.group(1)), os.path.join(ckpt_dir, n)))
    return sorted(out, reverse=True)


def _is_real(path: str, kind=stat.S_ISREG) -> bool:
    """``path`` exists and is of ``kind`` itself (a symlink never counts)."""
    try:
        return kind(os.lstat(path).st_mode)
    except OSError:
        return False


def resolve(path: str) -> list[str]:
    """A checkpoint directory, a ``checkpoints`` directory or a run directory -> checkpoint
    directories to try, newest first (the ``latest`` pointer's target first when it exists)."""
    if os.path.isfile(os.path.join(path, NAME)) or STEP_DIR.match(os.path.basename(os.path.normpath(path))):
        return [path]
    ckpt = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
    found = [p for _, p in list_checkpoints(ckpt)]
    try:
        fd, _ = open_regular(os.path.join(ckpt, LATEST), os.path.join(ckpt, LATEST))
        try:
            text = read_exact(fd, 4096).decode(errors="replace")
        finally:
            os.close(fd)
        target = os.path.join(ckpt, safe_file_name(text.strip(), os.path.join(ckpt, LATEST)))
        if target in found and found[0] != target:
            log.info("%s names %s but %s is newer and committed", LATEST, target, found[0])
    except (FileNotFoundError, CheckpointFormatError):
        pass
    return found


class CheckpointReader:
    """Opens one checkpoint directory. ``reader(name, global_shape, box, flat)`` is the
    strategy's ``ShardReader``; ``names``, ``shape(name)`` and ``dtype(name)`` describe what
    the checkpoint holds. Call :meth:`release` to drop the file buffers after loading."""

    def __init__(self, path: str, verify: bool = True):
        self.path, self.verify = os.path.abspath(path), verify
        mpath = os.path.join(self.path, NAME)
        if not _is_real(self.path, stat.S_ISDIR):
            raise CheckpointFormatError(
                f"{self.path}: not a directory (a symlink is not followed)\nHINT: point at the checkpoint "
                "directory itself; it was not read"
            )
        try:
            fd, size = open_regular(mpath, mpath)
        except FileNotFoundError:
            raise CheckpointCorruptError(f"{mpath}: missing; {self.path} is not a committed checkpoint") from None
        try:
            if size > manifest_mod.MAX_BYTES:
                raise CheckpointFormatError(
                    f"{mpath}: {size} bytes, over the manifest limit of {manifest_mod.MAX_BYTES}\nHINT: not a "
                    "manifest disttrain writes; it was not read"
                )
            text = read_exact(fd, size)
        finally:
            os.close(fd)
        self.manifest: Manifest = parse(text, mpath)
        self._verified: set[str] = set()
        self.names = frozenset(self.manifest.tensors)

    # -- description ---------------------------------------------------------------------
    @property
    def step(self) -> int:
        return self.manifest.step

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return FROM_NAME[self._info(name).dtype]

    def _info(self, name: str):
        try:
            return self.manifest.tensors[name]
        except KeyError:
            raise CheckpointMismatchError(
                f"{self.path}: the checkpoint has no tensor {name!r} "
                f"(it holds {len(self.names)} tensors)\nHINT: `disttrain ckpt inspect "
                f"{self.path}` lists them; was it saved from another model?"
            ) from None

    def where(self, file: str) -> str:
        rank = self.manifest.files.get(file, {}).get("rank", "?")
        return f"{os.path.join(self.path, file)} (written by rank {rank})"

    # -- verified bytes ------------------------------------------------------------------
    def _open(self, name: str) -> int:
        """An fd on ``name`` (a regular file in the directory, of the manifest's size). The caller closes."""
        info = self.manifest.files.get(name)
        if info is None:
            raise CheckpointFormatError(f"{self.path}: {name!r} is not listed in the manifest")
        try:
            dfd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise CheckpointCorruptError(f"{self.path}: cannot open the directory ({exc.strerror})") from None
        try:
            try:
                fd, size = open_regular(safe_file_name(name, self.path), self.where(name), dir_fd=dfd)
            finally:
                os.close(dfd)
        except FileNotFoundError:
            raise CheckpointCorruptError(
                f"{self.where(name)}: missing; expected {info['size']} bytes with checksum {info['checksum']}"
            ) from None
        if size != info["size"]:  # before reading: a sparse 100 GB file costs nothing here
            os.close(fd)
            raise CheckpointCorruptError(
                f"{self.where(name)}: {'truncated: ' if size < info['size'] else ''}size {size}, expected "
                f"{info['size']} from the manifest\nHINT: the file was damaged or replaced after the save; it "
                "was not read. An older checkpoint may still verify (`disttrain ckpt verify RUN_DIR`)"
            )
        return fd

    def _verify_file(self, name: str) -> None:
        """Check ``name`` once: its size, its checksum (streamed in chunks: memory stays at one chunk
        whatever the file's size), and for a shard its safetensors header against the manifest."""
        if name in self._verified:
            return
        info = self.manifest.files[name] if name in self.manifest.files else None
        fd = self._open(name)
        try:
            if self.verify:
                h, got = checksum.hasher(), 0
                chunk = memoryview(bytearray(min(_CHUNK, max(info["size"], 1))))
                while got < info["size"]:
                    n = pread_into(fd, chunk[: min(len(chunk), info["size"] - got)], got)
                    if not n:
                        break
                    h.update(chunk[:n])
                    got += n
                actual = h.hexdigest()
                if got != info["size"] or actual != info["checksum"]:
                    raise CheckpointCorruptError(
                        f"{self.where(name)}: {'truncated: ' if got < info['size'] else ''}size {got}, expected "
                        f"{info['size']}; checksum {actual}, expected {info['checksum']} ({checksum.ALGORITHM})"
                        "\nHINT: the file was damaged after the save; an older checkpoint may still verify "
                        "(`disttrain ckpt verify RUN_DIR`)"
                    )
            if name.endswith(manifest_mod.SHARD_SUFFIX):
                self._cross_check(name, fd, info["size"])
        finally:
            os.close(fd)
        self._verified.add(name)

    def _read_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Bytes [start, stop) of a verified file as a uint8 tensor: only that range is read."""
        self._verify_file(name)
        buf = torch.empty(stop - start, dtype=torch.uint8)
        fd = self._open(name)
        try:
            got = pread_into(fd, memoryview(buf.numpy()), start) if stop > start else 0
        finally:
            os.close(fd)
        if got != stop - start:
            raise CheckpointCorruptError(
                f"{self.where(name)}: bytes [{start}, {stop}) ended after {got}; the file changed while it was read"
            )
        return buf

    def file_bytes(self, name: str) -> torch.Tensor:
        """The whole of a verified file (for state.json; shards are read piece by piece)."""
        return self._read_range(name, 0, self.manifest.files[name]["size"] if name in self.manifest.files else 0)

    def _cross_check(self, name: str, fd: int, size: int) -> None:
        head = read_at(fd, 8, 0)
        if len(head) == 8 and int.from_bytes(head, "little") <= MAX_HEADER:
            head = read_at(fd, 8 + int.from_bytes(head, "little"), 0)
        entries, _ = parse_header(head, size, self.where(name))
        for tname, t in self.manifest.tensors.items():
            for p in t.pieces:
                if p.file != name:
                    continue
                e = entries.get(p.key)
                shape = (box_numel(p.box),) if p.flat else tuple(b - a for a, b in p.box)
                if (
                    e is None
                    or (e.start, e.stop) != (p.start, p.stop)
                    or e.dtype != FROM_NAME[t.dtype]
                    or tuple(e.shape) != shape
                ):
                    raise CheckpointFormatError(
                        f"{self.where(name)}: header entry {p.key!r} does not match the manifest's piece of {tname!r}"
                    )

    def state(self) -> dict:
        """The trainer-level JSON state (step, RNG, data position, config), verified and type-checked."""
        if STATE not in self.manifest.files:
            return {}
        where = self.where(STATE)
        with _as_corrupt(where):
            obj = loads_strict(bytes(self.file_bytes(STATE).numpy()), where)
            return state_mod.check(obj, where)

    def verify_all(self) -> None:
        """Read and check every file (what ``disttrain ckpt verify`` does)."""
        for name in self.manifest.files:
            with _as_corrupt(self.where(name)):
                self._verify_file(name)

    # -- the ShardReader ----------------------------------------------------------------
    def __call__(self, name: str, global_shape, box, flat: bool = False) -> torch.Tensor:
        info = self._info(name)
        global_shape, box = tuple(global_shape), tuple(tuple(b) for b in box)
        if tuple(info.shape) != global_shape:
            raise CheckpointMismatchError(
                f"{self.path}: tensor {name!r} has shape {list(info.shape)} in the "
                f"checkpoint, the loader expects {list(global_shape)}\nHINT: the model "
                "config differs from the one that saved it"
            )
        dtype = FROM_NAME[info.dtype]
        out = torch.empty((box_numel(box),) if flat else tuple(b - a for a, b in box), dtype=dtype)
        covered = 0
        for p in info.pieces:
            if not _overlaps(box, flat, p.box, p.flat, global_shape):
                continue
            with _as_corrupt(f"{self.where(p.file)}: piece of {name!r}"):
                raw = self._read_range(p.file, p.start, p.stop)
                src = raw.view(dtype).view((box_numel(p.box),) if p.flat else tuple(b - a for a, b in p.box))
                covered += copy_overlap(out, box, flat, src, p.box, p.flat, global_shape)
        if covered != out.numel():
            raise CheckpointMismatchError(
                f"{self.path}: tensor {name!r}: the checkpoint covers {covered} of the "
                f"{out.numel()} elements of box {[list(b) for b in box]}"
            )
        return out

    def release(self) -> None:
        """Forget which files were verified (nothing is held open or buffered between calls)."""
        self._verified.clear()


def read_at(fd: int, n: int, offset: int) -> bytes:
    buf = bytearray(n)
    return bytes(memoryview(buf)[: pread_into(fd, memoryview(buf), offset)])


def _overlaps(box, flat: bool, pbox, pflat: bool, shape) -> bool:
    """Whether a piece can contribute to ``box`` (nd boxes of the same kind are compared directly;
    mixed flat/nd pieces are always read and left to ``copy_overlap``)."""
    if flat != pflat or len(box) != len(pbox):
        return True
    return all(max(a, c) < min(b, d) for (a, b), (c, d) in zip(box, pbox))


@contextlib.contextmanager
def _as_corrupt(where: str):
    """Turn what a hostile file provokes in code not written to raise it (deep nesting, wrong
    types, impossible shapes, an allocation it made too big) into CheckpointFormatError, so a
    loader falls back and sets the checkpoint aside instead of stopping."""
    try:
        yield
    except CheckpointError:
        raise
    except (*BAD_INPUT, RuntimeError) as exc:
        raise CheckpointFormatError(
            f"{where}: malformed ({type(exc).__name__}: {str(exc)[:300]})\nHINT: not a checkpoint disttrain "
            "writes, or it was damaged; it was not used"
        ) from None
