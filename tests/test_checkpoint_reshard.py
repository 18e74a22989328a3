"""Reshard: a checkpoint saved on 4 ranks resumes on 2, 3 and 1 rank(s), optimizer state and
data position included, and one more step matches the single process within the trainer
equivalence tolerance (2e-5: only the float32 summation order of gradients differs)."""
import os
import shutil

import pytest
import torch

from disttrain.checkpoint import CheckpointReader, resolve
from tests.harness import spawn

pytestmark = pytest.mark.timeout(240)
TARGET = "tests.cases.ckpt_train:train"
ATOL = 2e-5


def test_ddp_checkpoint_from_4_ranks_resumes_on_2_3_and_1(tmp_path):
    saved = str(tmp_path / "w4")
    r4 = spawn(TARGET, 4, args={"run_dir": saved, "overrides": ["train.steps=3", "checkpoint.every=0"]}, timeout=200)
    (ck,) = resolve(saved)
    reader = CheckpointReader(ck)
    assert reader.manifest.world_size == 4
    assert len({f["rank"] for f in reader.manifest.files.values()}) == 4  # replicated state spread over ranks
    for name, values in r4[0]["state"].items():  # the checkpoint holds exactly the trained state
        key = name if name.startswith("optim.") else f"model.{name}"
        shape = reader.shape(key)
        assert torch.equal(reader(key, shape, tuple((0, s) for s in shape)).reshape(-1), torch.tensor(values)), key
    out = {}
    for world in (1, 2, 3):
        run = str(tmp_path / f"w{world}")
        shutil.copytree(saved, run)
        res = spawn(TARGET, world, args={"run_dir": run, "overrides": ["train.steps=4", "checkpoint.every=0"]},
                    timeout=200)
        assert [r["resumed_at"] for r in res] == [3] * world and [r["step"] for r in res] == [4] * world
        out[world] = res[0]
    for world in (2, 3):
        for name, ref in out[1]["state"].items():
            diff = (torch.tensor(out[world]["state"][name]) - torch.tensor(ref)).abs().max().item()
            assert diff <= ATOL, f"{world} ranks: {name} differs from one process by {diff:.3g}"
        assert abs(out[world]["losses"][-1] - out[1]["losses"][-1]) <= 1e-4
