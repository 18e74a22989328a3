"""The on-disk format, in one process: round trip through the real writer and reader,
resharding between flat (ZeRO-like) and nd (tensor-parallel-like) boxes, corrupt and
truncated files, and malformed input refused without running code."""

import json
import os
import pickle
import shutil
import struct

import pytest
import torch

from disttrain.checkpoint import (
    CheckpointCorruptError,
    CheckpointFormatError,
    CheckpointMismatchError,
    CheckpointReader,
    checksum,
    resolve,
)
from disttrain.checkpoint import cli as ckpt_cli
from disttrain.checkpoint.writer import RankWrite, commit
from disttrain.parallel.strategy import Shard

pytestmark = pytest.mark.timeout(60)

torch.manual_seed(0)
W = torch.randn(6, 10)  # tensor-parallel-like: rows split over ranks
E = torch.randn(5, 7)  # ZeRO-like: flat ranges over ranks
B = torch.randn(10).to(torch.bfloat16)  # replicated
S = torch.tensor(3.0)  # 0-d


def _shards(rank: int, world: int = 3) -> list[Shard]:
    r0, r1 = rank * 6 // world, (rank + 1) * 6 // world
    f0, f1 = rank * 35 // world, (rank + 1) * 35 // world
    out = [
        Shard("model.w", W[r0:r1].clone(), (6, 10), ((r0, r1), (0, 10))),
        Shard("model.e", E.reshape(-1)[f0:f1].clone(), (5, 7), ((f0, f1),), flat=True),
    ]
    if rank == 0:
        out += [
            Shard("model.b", B.clone(), (10,), ((0, 10),), replicated=True),
            Shard("optim.b.step", S.clone(), (), (), replicated=True),
        ]
    return out


def _save(ckpt_dir: str, step: int = 5, world: int = 3) -> str:
    records = []
    for r in range(world):
        job = RankWrite(ckpt_dir, step, r, _shards(r, world))
        job.write_live()
        records.append(job.record({"rng": {}}))
    return commit(
        ckpt_dir, step, world, {"strategy": "test"}, records, {"step": step, "config": {"model": {"n_head": 2}}}, keep=2
    )


@pytest.fixture
def ckpt(tmp_path):
    return _save(str(tmp_path / "checkpoints"))


def _rewrite_manifest(path: str, fn) -> None:
    m = json.loads(open(os.path.join(path, "manifest.json")).read())
    fn(m)
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(m, f)


def _replace_file(path: str, name: str, data: bytes) -> None:
    """Swap a file's bytes (padded with zeros to its size: the manifest fixes each shard's size) and
    fix its manifest checksum: only the structural checks can refuse it."""
    size = os.path.getsize(os.path.join(path, name))
    assert len(data) <= size
    data += b"\0" * (size - len(data))
    with open(os.path.join(path, name), "wb") as f:
        f.write(data)

    def fix(m):
        m["files"][name].update(checksum=checksum.digest(data))

    _rewrite_manifest(path, fix)


@pytest.mark.unit
def test_round_trip_and_reshard_between_flat_and_nd_boxes(ckpt):
    r = CheckpointReader(ckpt)
    assert (
        r.step == 5 and r.state()["step"] == 5 and sorted(r.names) == ["model.b", "model.e", "model.w", "optim.b.step"]
    )
    assert torch.equal(r("model.w", (6, 10), ((0, 6), (0, 10))), W)
    assert torch.equal(r("model.e", (5, 7), ((0, 5), (0, 7))), E)  # flat pieces -> nd box
    assert torch.equal(r("model.e", (5, 7), ((1, 4), (2, 6))), E[1:4, 2:6])
    assert torch.equal(r("model.w", (6, 10), ((7, 45),), True), W.reshape(-1)[7:45])  # nd pieces -> flat box
    assert torch.equal(r("model.w", (6, 10), ((1, 5), (3, 9))), W[1:5, 3:9])  # across two ranks' rows
    assert (
        torch.equal(r("model.b", (10,), ((2, 8),)), B[2:8]) and r("model.b", (10,), ((0, 10),)).dtype == torch.bfloat16
    )
    assert float(r("optim.b.step", (), ())) == 3.0
    with pytest.raises(CheckpointMismatchError, match="has shape"):
        r("model.w", (6, 11), ((0, 6), (0, 11)))
    with pytest.raises(CheckpointMismatchError, match="no tensor 'model.zz'"):
        r("model.zz", (1,), ((0, 1),))
    # Plain safetensors reads our rank files.
    from safetensors import safe_open

    with safe_open(os.path.join(ckpt, "rank_00001.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("model.w"), W[2:4])


@pytest.mark.unit
def test_reshard_to_every_world_size(tmp_path):
    for world in (1, 2, 4):
        r = CheckpointReader(_save(str(tmp_path / f"w{world}"), world=world))
        for rank in range(3):  # loaded by 3 ranks with a flat (ZeRO) layout and a row (TP) layout
            f0, f1 = rank * 60 // 3, (rank + 1) * 60 // 3
            assert torch.equal(r("model.w", (6, 10), ((f0, f1),), True), W.reshape(-1)[f0:f1])
            assert torch.equal(
                r("model.e", (5, 7), ((0, 5), (rank * 7 // 3, (rank + 1) * 7 // 3))),
                E[:, rank * 7 // 3 : (rank + 1) * 7 // 3],
            )


@pytest.mark.unit
def test_corrupt_truncated_and_missing_files_are_named(ckpt):
    path = os.path.join(ckpt, "rank_00001.safetensors")
    data = bytearray(open(path, "rb").read())
    expected = checksum.digest(bytes(data))
    data[-3] ^= 0x40
    open(path, "wb").write(bytes(data))
    with pytest.raises(CheckpointCorruptError) as e:
        CheckpointReader(ckpt)("model.w", (6, 10), ((0, 6), (0, 10)))
    msg = str(e.value)
    assert "rank_00001.safetensors" in msg and "rank 1" in msg and expected in msg
    assert checksum.digest(bytes(data)) in msg
    open(path, "wb").write(bytes(data[:-100]))
    with pytest.raises(CheckpointCorruptError, match="truncated"):
        CheckpointReader(ckpt).verify_all()
    os.unlink(path)
    with pytest.raises(CheckpointCorruptError, match="missing"):
        CheckpointReader(ckpt).verify_all()
    assert ckpt_cli.main(["verify", ckpt]) == 1


class _Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):  # unpickling this would create a file
        return (open, (self.target, "w"))


@pytest.mark.unit
def test_pickle_renamed_safetensors_is_refused_without_running_it(ckpt, tmp_path):
    target = str(tmp_path / "pwned")
    _replace_file(ckpt, "rank_00002.safetensors", pickle.dumps(_Payload(target), protocol=2))
    with pytest.raises(CheckpointFormatError, match="not a safetensors file|over the safetensors limit"):
        CheckpointReader(ckpt).verify_all()
    assert ckpt_cli.main(["verify", ckpt]) == 1 and ckpt_cli.main(["inspect", ckpt]) == 0
    assert not os.path.exists(target)


@pytest.mark.unit
def test_header_over_limit_overlaps_and_duplicate_keys_are_refused(ckpt):
    name = "rank_00000.safetensors"
    _replace_file(ckpt, name, struct.pack("<Q", 200_000_000) + b"{}" + b"\0" * 64)
    with pytest.raises(CheckpointFormatError, match="over the safetensors limit"):
        CheckpointReader(ckpt).verify_all()

    def header_file(header: str, data_len: int) -> bytes:
        h = header.encode()
        return struct.pack("<Q", len(h)) + h + b"\0" * data_len

    overlap = (
        '{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}'
    )
    _replace_file(ckpt, name, header_file(overlap, 24))
    with pytest.raises(CheckpointFormatError, match="overlap"):
        CheckpointReader(ckpt).verify_all()
    dup = '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}'
    _replace_file(ckpt, name, header_file(dup, 16))
    with pytest.raises(CheckpointFormatError, match="duplicate key 'a'"):
        CheckpointReader(ckpt).verify_all()


@pytest.mark.unit
def test_malformed_manifests_are_refused(ckpt, tmp_path):
    good = open(os.path.join(ckpt, "manifest.json")).read()

    def expect(fn, match):
        _rewrite_manifest(ckpt, fn)
        with pytest.raises(CheckpointFormatError, match=match):
            CheckpointReader(ckpt)
        open(os.path.join(ckpt, "manifest.json"), "w").write(good)

    def rename(new):
        def fn(m):
            m["files"][new] = m["files"].pop("rank_00000.safetensors")
            for t in m["tensors"].values():
                for p in t["pieces"]:
                    p["file"] = new if p["file"] == "rank_00000.safetensors" else p["file"]

        return fn

    for bad in ("../outside.safetensors", "/etc/passwd", "sub/x.safetensors", ".."):
        expect(rename(bad), "leaves the checkpoint directory")

    def overlap(m):
        p = m["tensors"]["model.w"]["pieces"]
        p[1]["start"], p[1]["stop"] = p[0]["start"], p[0]["stop"]
        p[1]["file"] = p[0]["file"]

    expect(overlap, "overlap")
    expect(lambda m: m.update(version=99), "format version 99")
    open(os.path.join(ckpt, "manifest.json"), "w").write(good[:-1] + ',"step":7}')
    with pytest.raises(CheckpointFormatError, match="duplicate key 'step'"):
        CheckpointReader(ckpt)
    open(os.path.join(ckpt, "manifest.json"), "w").write(good)
    # A symlink named like a listed file is not followed out of the directory.
    outside = tmp_path / "outside.bin"
    shutil.copy(os.path.join(ckpt, "rank_00000.safetensors"), outside)
    os.unlink(os.path.join(ckpt, "rank_00000.safetensors"))
    os.symlink(outside, os.path.join(ckpt, "rank_00000.safetensors"))
    with pytest.raises(CheckpointFormatError, match="outside the checkpoint directory"):
        CheckpointReader(ckpt).verify_all()


@pytest.mark.unit
def test_commit_keeps_last_k_and_ignores_temporaries(tmp_path):
    d = str(tmp_path / "checkpoints")
    for step in (1, 2, 3):
        _save(d, step=step)
    os.makedirs(os.path.join(d, ".tmp-step_000004"))
    assert [os.path.basename(p) for p in resolve(d)] == ["step_000003", "step_000002"]
    assert open(os.path.join(d, "latest")).read().strip() == "step_000003"
    assert [os.path.basename(p) for p in resolve(str(tmp_path))] == ["step_000003", "step_000002"]


@pytest.mark.unit
def test_cli_reshard_check_and_consolidate(ckpt, tmp_path, capsys):
    assert ckpt_cli.main(["reshard", ckpt, "--check", "--to", "zero2:5"]) == 1  # only model.b has optimizer state
    assert "optimizer state missing for 2 parameters" in capsys.readouterr().out
    assert ckpt_cli.main(["reshard", ckpt, "--check", "--to", "ddp:4,tp=3"]) == 1
    assert "not a multiple of tp*pp" in capsys.readouterr().out
    assert ckpt_cli.main(["reshard", ckpt, "--check", "--to", "ddp:4,tp=4"]) == 1
    assert "does not divide n_head=2" in capsys.readouterr().out
    out = str(tmp_path / "model.safetensors")
    assert ckpt_cli.main(["consolidate", ckpt, out]) == 0
    from safetensors.torch import load_file

    sd = load_file(out)
    assert torch.equal(sd["w"], W) and torch.equal(sd["e"], E) and set(sd) == {"w", "e", "b"}


@pytest.mark.unit
def test_writing_leaves_the_callers_tensors_resizable(tmp_path):
    """A live write reads the model's own tensors in place; it must not mark their storage non-resizable
    (ZeRO-3 frees gathered parameters by resizing it to zero)."""
    shards = _shards(0)
    RankWrite(str(tmp_path / "checkpoints"), 1, 0, shards).write_live()
    for s in shards:
        s.tensor.untyped_storage().resize_(0)
