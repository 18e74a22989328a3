"""Kill-and-resume through ``disttrain run``: rank 1 is SIGKILLed mid-run, the launcher
restarts the group (launch.max_restarts=1), the trainer resumes from the latest checkpoint,
and the final state equals an uninterrupted run's bit for bit (same ranks, same data)."""

import os
import subprocess
import sys

import pytest

from disttrain.checkpoint import CheckpointReader, resolve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["train.steps=30", "train.log_every=10", "train.eval_every=0", "checkpoint.every=10", "launch.max_restarts=1"]


def _run(run_dir: str, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "disttrain.cli", "run", "configs/digits.yaml", f"run.dir={run_dir}", *ARGS],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.timeout(320)
def test_killed_rank_resumes_and_equals_uninterrupted_run(tmp_path):
    killed, clean = str(tmp_path / "killed"), str(tmp_path / "clean")
    p = _run(killed, {"DISTTRAIN_CKPT_TEST_HOOK": "kill@step_end:1:15"})
    assert "resumed from" in p.stdout and "step_000010" in p.stdout, p.stdout[-3000:]
    _run(clean)
    a, b = resolve(killed)[0], resolve(clean)[0]
    # keep=2, plus the checkpoint the restarted group resumed from (pruning never drops it)
    assert [os.path.basename(p) for p in resolve(killed)] == ["step_000030", "step_000020", "step_000010"]
    assert os.path.basename(a) == os.path.basename(b) == "step_000030"
    ra, rb = CheckpointReader(a), CheckpointReader(b)
    assert ra.names == rb.names
    for name in sorted(ra.names):
        shape = ra.shape(name)
        box = tuple((0, s) for s in shape)
        assert ra(name, shape, box).equal(rb(name, shape, box)), name
    sa, sb = ra.state(), rb.state()
    assert sa["rng"] == sb["rng"] and sa["step"] == sb["step"] == 30
