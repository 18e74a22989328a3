"""Attacks on the checkpoint reader through files planted in a checkpoint directory (a 100 GB
sparse shard, a FIFO, symlinks, a huge manifest, a manifest of too many pieces), and keep-K
pruning after a fallback past a corrupt checkpoint."""

from __future__ import annotations

import json
import os
import threading

import pytest
import torch

from disttrain.checkpoint import CheckpointReader, resolve
from disttrain.checkpoint import manifest as manifest_mod
from disttrain.checkpoint.errors import CheckpointCorruptError, CheckpointFormatError
from disttrain.checkpoint.reader import list_checkpoints
from disttrain.checkpoint.writer import RankWrite, commit
from disttrain.parallel.strategy import Shard
from tests.support.harness import spawn

SHARD = "rank_00000.safetensors"


def _save(ckpt_dir: str, step: int = 1) -> str:
    """One rank's real save of two tensors through the writer, committed."""
    os.makedirs(ckpt_dir, exist_ok=True)
    w = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    shards = [Shard("model.w", w, (6, 10), ((0, 6), (0, 10))), Shard("model.b", torch.ones(10), (10,), ((0, 10),))]
    job = RankWrite(ckpt_dir, step, 0, shards)
    job.write_live()
    return commit(ckpt_dir, step, 1, {"strategy": "test"}, [job.record({"rng": {}})], {"step": step}, keep=2)


def _read_all(path: str) -> None:
    r = CheckpointReader(path)
    r.verify_all()
    r("model.w", (6, 10), ((0, 6), (0, 10)))


def _bounded(fn, seconds: float = 20.0):
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it blocks."""
    out: dict = {}

    def run():
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["exc"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "the reader blocked"
    return out.get("exc")


@pytest.mark.unit
def test_a_100_gb_sparse_shard_is_refused_before_any_allocation(tmp_path):
    path = _save(str(tmp_path / "ckpt"))
    shard = os.path.join(path, SHARD)
    with open(shard, "r+b") as f:
        f.truncate(100 * 1000**3)  # sparse: no disk, but 100 GB if a reader believed its size
    exc = _bounded(lambda: _read_all(path))
    assert isinstance(exc, CheckpointCorruptError), exc
    assert "size 100000000000" in str(exc) and "it was not read" in str(exc)


@pytest.mark.unit
def test_a_fifo_in_place_of_a_shard_or_manifest_is_refused_not_waited_on(tmp_path):
    path = _save(str(tmp_path / "ckpt"))
    os.unlink(os.path.join(path, SHARD))
    os.mkfifo(os.path.join(path, SHARD))  # nobody ever writes to it: a blocking open would hang
    exc = _bounded(lambda: _read_all(path))
    assert isinstance(exc, CheckpointFormatError) and "is a FIFO" in str(exc), exc
    manifest = os.path.join(path, "manifest.json")
    os.unlink(manifest)
    os.mkfifo(manifest)
    exc = _bounded(lambda: CheckpointReader(path))
    assert isinstance(exc, CheckpointFormatError) and "is a FIFO" in str(exc), exc
    assert list_checkpoints(str(tmp_path / "ckpt")) == []  # a FIFO manifest is no commit


@pytest.mark.unit
def test_symlinks_are_not_followed_for_shards_manifests_pointers_or_step_directories(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    path = _save(ckpt)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # A shard replaced by a link to a copy of itself outside the directory.
    os.rename(os.path.join(path, SHARD), elsewhere / SHARD)
    os.symlink(elsewhere / SHARD, os.path.join(path, SHARD))
    exc = _bounded(lambda: _read_all(path))
    assert isinstance(exc, CheckpointFormatError) and "symbolic link" in str(exc), exc
    # The manifest as a link.
    os.rename(os.path.join(path, "manifest.json"), elsewhere / "manifest.json")
    os.symlink(elsewhere / "manifest.json", os.path.join(path, "manifest.json"))
    exc = _bounded(lambda: CheckpointReader(path))
    assert isinstance(exc, CheckpointFormatError) and "symbolic link" in str(exc), exc
    # A step directory that is a link to a checkpoint elsewhere is not a checkpoint of this run,
    # and a `latest` pointer that is a link is not read.
    good = _save(str(tmp_path / "other"), step=5)
    os.symlink(good, os.path.join(ckpt, "step_000009"))
    os.unlink(os.path.join(ckpt, "latest"))
    os.symlink(os.path.join(good, "..", "latest"), os.path.join(ckpt, "latest"))
    assert [s for s, _ in list_checkpoints(ckpt)] == []
    assert resolve(ckpt) == []
    exc = _bounded(lambda: CheckpointReader(os.path.join(ckpt, "step_000009")))
    assert isinstance(exc, CheckpointFormatError) and "not a directory" in str(exc), exc


@pytest.mark.unit
def test_a_huge_manifest_and_one_of_too_many_pieces_are_refused_before_parsing(tmp_path, monkeypatch):
    path = _save(str(tmp_path / "ckpt"))
    manifest = os.path.join(path, "manifest.json")
    good = open(manifest, "rb").read()
    with open(manifest, "r+b") as f:
        f.truncate(manifest_mod.MAX_BYTES + 1)  # sparse
    exc = _bounded(lambda: CheckpointReader(path))
    assert isinstance(exc, CheckpointFormatError) and "over the manifest limit" in str(exc), exc
    # Under the byte limit but over the piece limit (lowered here so the file stays small).
    obj = json.loads(good)
    piece = obj["tensors"]["model.b"]["pieces"][0]
    obj["tensors"]["model.b"]["pieces"] = [piece] * 5000
    open(manifest, "w").write(json.dumps(obj))
    monkeypatch.setattr(manifest_mod, "MAX_PIECES", 4096)
    exc = _bounded(lambda: CheckpointReader(path))
    assert isinstance(exc, CheckpointFormatError) and "5001 pieces, over the limit" in str(exc), exc


@pytest.mark.unit
def test_overlap_check_of_many_pieces_is_fast_and_still_finds_an_overlap(tmp_path):
    """20,000 row pieces: the pairwise check would take minutes; the sweep takes milliseconds."""
    n = 20_000
    pieces = [manifest_mod.Piece("f", f"k{i}", 4 * i, 4 * i + 4, ((i, i + 1), (0, 1)), False) for i in range(n)]
    files = {"f": {"rank": 0, "size": 4 * n, "checksum": "x"}}
    m = manifest_mod.Manifest(1, 1, {}, files, {"t": manifest_mod.TensorInfo((n, 1), "float32", tuple(pieces))})
    manifest_mod.validate(m, "m")
    bad = list(pieces)
    bad[-1] = manifest_mod.Piece("f", "kx", 4 * (n - 1), 4 * n, ((n - 2, n - 1), (0, 1)), False)
    m.tensors["t"] = manifest_mod.TensorInfo((n, 1), "float32", tuple(bad))
    with pytest.raises(CheckpointFormatError, match="overlap"):
        manifest_mod.validate(m, "m")


@pytest.mark.timeout(240)
def test_pruning_after_a_fallback_keeps_the_resumed_checkpoint_and_sets_the_corrupt_one_aside(tmp_path):
    run = str(tmp_path / "run")
    base = ["train.steps=4", "checkpoint.every=2", "checkpoint.keep=2", "checkpoint.async_save=false"]
    (first,) = spawn("tests.cases.ckpt_train:train", 1, args={"run_dir": run, "overrides": base}, timeout=200)
    assert first["step"] == 4
    ckpt = os.path.join(run, "checkpoints")
    assert [s for s, _ in list_checkpoints(ckpt)] == [4, 2]
    shard = os.path.join(ckpt, "step_000004", SHARD)
    data = bytearray(open(shard, "rb").read())
    data[-5] ^= 0xFF  # bit rot in the newest checkpoint
    open(shard, "wb").write(bytes(data))
    more = ["train.steps=6", "checkpoint.every=2", "checkpoint.keep=1", "checkpoint.async_save=false"]
    (second,) = spawn("tests.cases.ckpt_train:train", 1, args={"run_dir": run, "overrides": more}, timeout=200)
    assert second["resumed_at"] == 2 and second["step"] == 6
    names = sorted(os.listdir(ckpt))
    # keep=1 keeps the newest (step 6) and the one this run resumed from (step 2); the corrupt
    # step 4 was moved aside, not counted and not deleted; the re-saved step 4 went.
    assert [s for s, _ in list_checkpoints(ckpt)] == [6, 2], names
    assert "step_000004.corrupt" in names, names
    assert open(os.path.join(ckpt, "step_000004.corrupt", SHARD), "rb").read() == bytes(data)
    CheckpointReader(os.path.join(ckpt, "step_000006")).verify_all()
