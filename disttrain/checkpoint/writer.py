"""Writing a checkpoint: each rank its shard file, then rank 0 the manifest and the commit.

Per save, on every rank: ``RankWrite(...)`` lays out this rank's file (header + tensors);
``write_live()`` (sync: straight from the live tensors, no copy) or ``stage()`` then
``write_staged()`` (async: a snapshot in an aligned host buffer, written with O_DIRECT
where the file system allows, so the page cache is not a second copy) writes
``<tmp>/rank_NNNNN.safetensors``, hashes it and fsyncs it. Then rank 0 alone calls
:func:`commit` with every rank's record: state.json, manifest.json (fsynced, last), rename
of the temporary directory to ``step_NNNNNN`` (the commit point), fsync of the parent,
the ``latest`` pointer (replaced by rename), and pruning to the last ``keep``.
A crash anywhere before the rename leaves only a ``.tmp-*`` directory nobody reads.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import torch

from .. import rundir
from . import checksum, retention, testhooks
from .manifest import NAME, STATE, Manifest, Piece, TensorInfo, validate
from .reader import LATEST, step_dir_name
from .shardfile import ALIGN, NAMES, layout, shard_metadata, tensor_bytes

log = logging.getLogger(__name__)
TMP_PREFIX = ".tmp-"
_DIRECT_CHUNK = 16 << 20


def tmp_dir(ckpt_dir: str, step: int) -> str:
    return os.path.join(ckpt_dir, TMP_PREFIX + step_dir_name(step))


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.safetensors"


def _make_tmp_dir(path: str) -> None:
    """The save's temporary directory (every rank may call it; the first creates it)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rundir.make_dir(path)


def _create(path: str, extra: int = 0) -> int:
    """A new file for writing: ``O_EXCL | O_NOFOLLOW`` (a planted link or file is never written
    through), 0600 (0640 in a shared group run). One left by an earlier try of the same save in
    our own temporary directory is removed first."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC | extra
    try:
        return os.open(path, flags, rundir.file_mode())
    except FileExistsError:
        os.unlink(path)
        return os.open(path, flags, rundir.file_mode())


def _write_all(fd: int, mv: memoryview) -> None:
    while len(mv):
        n = os.write(fd, mv)
        mv = mv[n:]


class RankWrite:
    """One rank's file for one save. ``shards`` are the Shard objects this rank writes."""

    def __init__(self, ckpt_dir: str, step: int, rank: int, shards: list):
        self.dir, self.step, self.rank, self.shards = tmp_dir(ckpt_dir, step), step, rank, shards
        self.file = rank_file(rank)
        keys, seen = [], {}
        for s in shards:
            seen[s.name] = seen.get(s.name, 0) + 1
            keys.append(s.name if seen[s.name] == 1 else f"{s.name}#{seen[s.name]}")
        self.keys = keys
        items = [(k, s.tensor.dtype, tuple(s.tensor.shape)) for k, s in zip(keys, shards)]
        self.header, entries, self.size = layout(items, shard_metadata(rank, step))
        self.entries = {e.key: e for e in entries}
        self.checksum: str | None = None

    @property
    def path(self) -> str:
        return os.path.join(self.dir, self.file)

    def record(self, local_state: dict) -> dict:
        """What rank 0 needs to build the manifest (JSON-serialisable)."""
        pieces = []
        for k, s in zip(self.keys, self.shards):
            e = self.entries[k]
            pieces.append(
                {
                    "name": s.name,
                    "shape": list(s.global_shape),
                    "dtype": NAMES[s.tensor.dtype],
                    "key": k,
                    "start": e.start,
                    "stop": e.stop,
                    "box": [list(b) for b in s.box],
                    "flat": s.flat,
                }
            )
        return {
            "rank": self.rank,
            "file": self.file,
            "size": self.size,
            "checksum": self.checksum,
            "pieces": pieces,
            "state": local_state,
        }

    # -- sync: from the live tensors -------------------------------------------------------
    def write_live(self) -> None:
        _make_tmp_dir(self.dir)
        h = checksum.hasher()
        fd = _create(self.path)
        try:
            _write_all(fd, memoryview(self.header))
            h.update(self.header)
            for _k, s in sorted(zip(self.keys, self.shards), key=lambda ks: self.entries[ks[0]].start):
                mv = tensor_bytes(s.tensor.detach().to("cpu").contiguous())
                h.update(mv)
                _write_all(fd, mv)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.checksum = h.hexdigest()
        testhooks.fire("after_shard", self.rank, self.step)

    # -- async: snapshot into a staging buffer, write later ----------------------------------
    def stage(self, staging: torch.Tensor, views: dict | None = None) -> None:
        """Copy header and tensors into ``staging`` (aligned, >= size rounded up to ALIGN). Fast;
        the caller must not let the tensors change until it returns. ``views``: a caller's cache (a
        dict, empty at first) for one who stages the same CPU tensors into the same buffer again and
        again (peer copies, every step): the byte views of each source and destination are made once
        and reused while the buffer, every offset and every source's address stay the same."""
        staging[: len(self.header)].copy_(torch.frombuffer(bytearray(self.header), dtype=torch.uint8))
        if views is not None and self._stage_views(staging, views):
            staging[self.size : -(-self.size // ALIGN) * ALIGN].zero_()
            return
        cuda = False
        for k, s in zip(self.keys, self.shards):
            e = self.entries[k]
            dst = staging[e.start : e.stop].view(s.tensor.dtype)
            src = s.tensor.detach().reshape(-1)
            cuda |= src.is_cuda
            if src.is_cuda:
                dst.copy_(src, non_blocking=True)
            elif src.numel():  # one plain memcpy: torch's intra-op parallel copy, called from a background
                # thread, would start its own thread team and fight the training thread for the cores
                np.copyto(dst.view(torch.uint8).numpy(), src.contiguous().view(torch.uint8).numpy())
        if cuda:
            torch.cuda.synchronize()
        staging[self.size : -(-self.size // ALIGN) * ALIGN].zero_()

    def _stage_views(self, staging: torch.Tensor, views: dict) -> bool:
        """``stage``'s tensors through the cached views; False (nothing copied) unless every source is a
        contiguous CPU tensor. The key holds what the views depend on, so a moved or replaced tensor
        (a new address or size), a new buffer or a new layout makes new ones."""
        srcs = [s.tensor for s in self.shards]
        if any(t.is_cuda or not t.is_contiguous() for t in srcs):
            return False
        spans = [(self.entries[k].start, self.entries[k].stop) for k in self.keys]
        key = (staging.data_ptr(), staging.numel(), tuple(spans), tuple((t.data_ptr(), t.nbytes) for t in srcs))
        if views.get("key") != key:
            pairs = [
                (staging[a:b].numpy(), t.detach().reshape(-1).view(torch.uint8).numpy())
                for (a, b), t in zip(spans, srcs)
                if b > a
            ]
            views.clear()
            views.update(key=key, pairs=pairs)
        for dst, src in views["pairs"]:
            np.copyto(dst, src)  # one plain memcpy each (see ``stage``)
        return True

    def write_staged(self, staging: torch.Tensor) -> None:
        _make_tmp_dir(self.dir)
        testhooks.fire("write", self.rank, self.step)
        padded = -(-self.size // ALIGN) * ALIGN
        data = memoryview(staging[:padded].numpy())
        h = checksum.hasher()
        fd, direct = None, hasattr(os, "O_DIRECT")
        if direct:
            try:
                fd = _create(self.path, os.O_DIRECT)
            except OSError:
                fd, direct = None, False
        if fd is None:
            fd = _create(self.path)
        try:
            off = 0
            while off < padded:
                chunk = data[off : min(off + _DIRECT_CHUNK, padded)]
                h.update(chunk[: max(0, min(len(chunk), self.size - off))])
                try:
                    _write_all(fd, chunk if direct else chunk[: max(0, self.size - off)])
                except OSError:
                    if not direct:
                        raise
                    # The file system refused O_DIRECT at write time (tmpfs, some FUSE): go buffered.
                    os.close(fd)
                    fd = os.open(self.path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                    os.lseek(fd, off, os.SEEK_SET)
                    direct = False
                    _write_all(fd, chunk[: max(0, self.size - off)])
                off += len(chunk)
            os.ftruncate(fd, self.size)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.checksum = h.hexdigest()
        testhooks.fire("after_shard", self.rank, self.step)


def aligned_empty(nbytes: int) -> torch.Tensor:
    """A uint8 host buffer whose first byte is ALIGN-aligned (pinned when CUDA is present)."""
    pin = torch.cuda.is_available()
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=pin)
    off = (-raw.data_ptr()) % ALIGN
    return raw[off : off + nbytes]


# -- rank 0: the commit ----------------------------------------------------------------------
def _write_file(path: str, data: bytes, kill_midway: bool = False, rank: int = 0, step: int = 0) -> None:
    fd = _create(path)
    try:
        half = len(data) // 2 if kill_midway else 0
        if kill_midway:
            _write_all(fd, memoryview(data)[:half])
            os.fsync(fd)
            testhooks.fire("mid_manifest", rank, step)
        _write_all(fd, memoryview(data)[half:])
        os.fsync(fd)
    finally:
        os.close(fd)


def build_manifest(
    step: int, world_size: int, layout_info: dict, records: list[dict], state_size: int, state_checksum: str
) -> Manifest:
    files = {r["file"]: {"rank": r["rank"], "size": r["size"], "checksum": r["checksum"]} for r in records}
    files[STATE] = {"rank": 0, "size": state_size, "checksum": state_checksum}
    tensors: dict[str, dict] = {}
    for r in records:
        for p in r["pieces"]:
            t = tensors.setdefault(p["name"], {"shape": tuple(p["shape"]), "dtype": p["dtype"], "pieces": []})
            if t["shape"] != tuple(p["shape"]) or t["dtype"] != p["dtype"]:
                raise ValueError(
                    f"tensor {p['name']!r}: rank {r['rank']} says {p['shape']} {p['dtype']}, another "
                    f"rank {list(t['shape'])} {t['dtype']}"
                )
            t["pieces"].append(
                Piece(r["file"], p["key"], p["start"], p["stop"], tuple(tuple(b) for b in p["box"]), p["flat"])
            )
    infos = {n: TensorInfo(t["shape"], t["dtype"], tuple(t["pieces"])) for n, t in sorted(tensors.items())}
    return Manifest(step, world_size, layout_info, files, infos)


def commit(
    ckpt_dir: str,
    step: int,
    world_size: int,
    layout_info: dict,
    records: list[dict],
    state: dict,
    keep: int,
    protect: tuple[int, ...] = (),
) -> str:
    """Rank 0, after every rank's file is written and fsynced: make the checkpoint visible."""
    tmp = tmp_dir(ckpt_dir, step)
    state_bytes = json.dumps(state, separators=(",", ":")).encode()
    _write_file(os.path.join(tmp, STATE), state_bytes)
    manifest = build_manifest(step, world_size, layout_info, records, len(state_bytes), checksum.digest(state_bytes))
    validate(manifest, os.path.join(tmp, NAME))  # never commit what a reader would refuse
    _write_file(os.path.join(tmp, NAME), manifest.to_json(), kill_midway=bool(os.environ.get(testhooks.ENV)), step=step)
    checksum.fsync_dir(tmp)
    testhooks.fire("before_rename", 0, step)
    final = os.path.join(ckpt_dir, step_dir_name(step))
    old = None
    if os.path.exists(final):  # re-saving a step (e.g. after falling back past a corrupt one)
        old = os.path.join(ckpt_dir, f"{TMP_PREFIX}old-{step_dir_name(step)}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    checksum.fsync_dir(ckpt_dir)
    if old:
        shutil.rmtree(old, ignore_errors=True)
    testhooks.fire("before_latest", 0, step)
    rundir.write_atomic(os.path.join(ckpt_dir, LATEST), (step_dir_name(step) + "\n").encode())
    checksum.fsync_dir(ckpt_dir)
    prune(ckpt_dir, keep, step, protect)
    return final


def prune(ckpt_dir: str, keep: int, current: int, protect: tuple[int, ...] = ()) -> None:
    """Keep the ``keep`` newest committed checkpoints (and ``current`` and ``protect``); see retention."""
    retention.prune(ckpt_dir, keep, current, protect, TMP_PREFIX)


def clean_temporaries(ckpt_dir: str) -> None:
    """Rank 0 at start, before any rank writes: remove what crashed saves left behind."""
    try:
        names = os.listdir(ckpt_dir)
    except FileNotFoundError:
        return
    for n in names:
        if n.startswith(TMP_PREFIX):
            shutil.rmtree(os.path.join(ckpt_dir, n), ignore_errors=True)
        elif n.startswith(f".{LATEST}.") and n.endswith(".tmp"):  # write_atomic's temporary of the pointer
            try:
                os.unlink(os.path.join(ckpt_dir, n))
            except FileNotFoundError:
                pass
