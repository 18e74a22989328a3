"""Reshard across world sizes and layouts: a ZeRO-2 checkpoint (flat pieces) saved on 4 ranks
resumes on 2 ranks with ZeRO-3, on 3 ranks with DDP (flat pieces into whole tensors) and on
one process, optimizer state and data position included; after one more step every final
checkpoint matches the single process within the trainer equivalence tolerance (2e-5: only
the float32 summation order of gradients differs)."""

import shutil

import pytest
import torch

from disttrain.checkpoint import CheckpointReader, resolve
from tests.support.harness import spawn

pytestmark = pytest.mark.timeout(300)
TARGET = "tests.cases.ckpt_train:train"
ATOL = 2e-5


def _full(reader, name):
    shape = reader.shape(name)
    return reader(name, shape, tuple((0, s) for s in shape))


def test_zero2_checkpoint_from_4_ranks_resumes_on_zero3_ddp_and_one_process(tmp_path):
    saved = str(tmp_path / "w4")
    r4 = spawn(
        TARGET,
        4,
        args={"run_dir": saved, "overrides": ["train.steps=3", "checkpoint.every=0", "parallel.strategy=zero2"]},
        timeout=250,
    )
    (ck,) = resolve(saved)
    reader = CheckpointReader(ck)
    assert reader.manifest.world_size == 4 and reader.manifest.layout["strategy"] == "zero2"
    assert len({f["rank"] for f in reader.manifest.files.values()}) == 4  # every rank wrote its own shards
    assert any(p.flat for t in reader.manifest.tensors.values() for p in t.pieces)
    for name, values in r4[0]["state"].items():  # the checkpoint holds exactly the trained parameters
        assert torch.equal(_full(reader, f"model.{name}").reshape(-1), torch.tensor(values)), name
    final = {}
    for world, strategy in ((1, "ddp"), (2, "zero3"), (3, "ddp")):
        run = str(tmp_path / f"w{world}")
        shutil.copytree(saved, run)
        res = spawn(
            TARGET,
            world,
            args={
                "run_dir": run,
                "overrides": ["train.steps=4", "checkpoint.every=0", f"parallel.strategy={strategy}"],
            },
            timeout=250,
        )
        assert [r["resumed_at"] for r in res] == [3] * world and [r["step"] for r in res] == [4] * world
        final[world] = CheckpointReader(resolve(run)[0])
        assert final[world].step == 4
    ref = final[1]
    for world in (2, 3):
        assert final[world].names == ref.names
        for name in sorted(ref.names):
            diff = (_full(final[world], name).double() - _full(ref, name).double()).abs().max().item()
            assert diff <= ATOL, f"{world} ranks: {name} differs from one process by {diff:.3g}"
