"""Async save: same bytes as a sync save of the same step although training continued while
it was written; a background failure raises on every rank at the next step, naming the rank."""

import os

import pytest

from disttrain.checkpoint import CheckpointReader, resolve
from tests.support.harness import spawn

pytestmark = pytest.mark.timeout(150)


def test_async_save_equals_sync_save_and_errors_surface(tmp_path):
    a, b = str(tmp_path / "sync"), str(tmp_path / "async")
    results = spawn("tests.cases.ckpt_async:async_vs_sync", 2, args={"dir_sync": a, "dir_async": b}, timeout=140)
    (pa,), (pb,) = resolve(a), resolve(b)
    assert os.path.basename(pa) == os.path.basename(pb) == "step_000003"
    names = sorted(os.listdir(pa))
    assert (
        names
        == sorted(os.listdir(pb))
        == ["manifest.json", "rank_00000.safetensors", "rank_00001.safetensors", "state.json"]
    )
    for n in names:
        assert open(os.path.join(pa, n), "rb").read() == open(os.path.join(pb, n), "rb").read(), n
    CheckpointReader(pb).verify_all()
    for r in results:
        assert r["error"] is not None and "failed on rank(s) [1]" in r["error"], r
    assert "injected failure at write on rank 1" in results[1]["error"]
