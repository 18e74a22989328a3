"""SIGKILL a rank at each stage of a save: the previous checkpoint stays byte-identical, the
half-written one is never visible, and a restart loads the newest complete checkpoint.

Two ranks train the digits job; ``DISTTRAIN_CKPT_TEST_HOOK`` makes one of them kill
itself at a named stage of the save of step 4 (see disttrain/checkpoint/testhooks.py).
"""

import os
import shutil

import pytest

from disttrain.checkpoint import CheckpointReader, resolve
from disttrain.checkpoint import cli as ckpt_cli
from tests.support.harness import RankFailure, spawn

pytestmark = pytest.mark.timeout(200)
TARGET = "tests.cases.ckpt_train:train"


def _files(path: str) -> dict[str, bytes]:
    return {n: open(os.path.join(path, n), "rb").read() for n in sorted(os.listdir(path))}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("base") / "run")
    r = spawn(TARGET, 2, args={"run_dir": run, "overrides": ["train.steps=2", "checkpoint.every=2"]}, timeout=150)
    assert [x["step"] for x in r] == [2, 2]
    (step2,) = resolve(run)
    return run, _files(step2)


@pytest.mark.parametrize(
    "stage,rank,world,overrides",
    [
        ("after_shard", 1, 2, ["train.steps=4"]),  # rank 1's file is on disk, rank 0's may be; no manifest
        # One rank (resumed from a 2-rank checkpoint) is enough for rank 0's stages and costs half.
        ("mid_manifest", 0, 1, ["train.steps=5", "checkpoint.async_save=true"]),  # async save; its commit dies
        ("before_rename", 0, 1, ["train.steps=4"]),  # complete temporary directory, never renamed
    ],
)
def test_kill_during_save_keeps_previous_checkpoint(base, tmp_path, stage, rank, world, overrides):
    run = str(tmp_path / "run")
    shutil.copytree(base[0], run)
    with pytest.raises(RankFailure) as e:
        spawn(
            TARGET,
            world,
            args={"run_dir": run, "overrides": overrides + ["checkpoint.every=2"]},
            env={"DISTTRAIN_CKPT_TEST_HOOK": f"kill@{stage}:{rank}:4"},
            timeout=150,
        )
    assert e.value.returncodes[rank] == -9, e.value
    ckpts = resolve(run)
    assert [os.path.basename(p) for p in ckpts] == ["step_000002"], os.listdir(os.path.join(run, "checkpoints"))
    assert _files(ckpts[0]) == base[1]  # byte-identical
    assert os.path.isdir(os.path.join(run, "checkpoints", ".tmp-step_000004"))
    CheckpointReader(ckpts[0]).verify_all()
    assert ckpt_cli.main(["verify", run]) == 0
    assert ckpt_cli.main(["reshard", run, "--check", "--to", "zero3:3"]) == 0
    if stage == "after_shard":
        # Restart, with a newer but corrupt checkpoint in the way: the job warns, falls back to
        # step 2 (the newest that verifies), finishes, replaces the corrupt one and cleans up.
        ck = os.path.join(run, "checkpoints")
        shutil.copytree(os.path.join(ck, "step_000002"), os.path.join(ck, "step_000003"))
        man = open(os.path.join(ck, "step_000003", "manifest.json")).read().replace('"step":2', '"step":3')
        open(os.path.join(ck, "step_000003", "manifest.json"), "w").write(man)
        with open(os.path.join(ck, "step_000003", "rank_00000.safetensors"), "r+b") as f:
            f.seek(5000)
            f.write(b"\xff\xfe")
        r = spawn(TARGET, 2, args={"run_dir": run, "overrides": ["train.steps=3", "checkpoint.every=0"]}, timeout=150)
        assert [x["resumed_at"] for x in r] == [2, 2] and [x["step"] for x in r] == [3, 3]
        assert [os.path.basename(p) for p in resolve(run)] == ["step_000003", "step_000002"]
        CheckpointReader(resolve(run)[0]).verify_all()  # re-saved over the corrupt one
        assert not [n for n in os.listdir(ck) if n.startswith(".tmp")]
        assert _files(resolve(run)[1]) == base[1]
