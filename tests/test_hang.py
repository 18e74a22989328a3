"""The hang watch through `disttrain run`, on the shm, torch and mpi backends: rank 1 stops forever
inside a step at a known line; within launch.hang_timeout plus a few seconds the launcher prints one
report naming rank 1 as behind, with that file and line, ends the job, and `disttrain trace RUN_DIR`
prints the report again."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.cases import hang_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.timeout(300)

YAML = """
run: {{name: hang, dir: {dir}}}
launch: {{nproc: 2, backend: {backend}, hang_timeout: 3, timeout: 120}}
model: {{kind: mlp, hidden: [16]}}
data: {{kind: digits}}
loss: {{target: "tests.cases.hang_step:step"}}
train: {{steps: 50, batch_size: 32, log_every: 100}}
checkpoint: {{enabled: false}}
"""


def _run(config) -> subprocess.CompletedProcess:
    """``disttrain run CONFIG`` in a fresh process, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "disttrain.cli", "run", str(config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=240,
        env={**os.environ, "PYTHONPATH": ROOT},
    )


def _hang_line(mark: str = "# HANG") -> int:
    with open(hang_step.__file__) as f:
        return next(i for i, line in enumerate(f, 1) if line.rstrip().endswith(mark))


@pytest.mark.parametrize("backend", ["shm", "torch", "mpi"])
def test_hang_report_names_the_rank_and_line(tmp_path, backend):
    if backend == "mpi":
        pytest.importorskip("mpi4py")
    config = tmp_path / "hang.yaml"
    config.write_text(YAML.format(dir=tmp_path / "run", backend=backend))
    t0 = time.monotonic()
    proc = _run(config)
    took = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    where = f"hang_step.py:{_hang_line()} in step"
    assert "disttrain: hang: no collective finished" in out and "rank 1 is behind" in out, out[-3000:]
    behind = next(line for line in out.splitlines() if "BEHIND rank 1@" in line)
    assert where in behind, out[-3000:]
    assert "waiting in allreduce" in next(line for line in out.splitlines() if line.startswith("  rank 0@")), out
    assert took < 120, took  # not the 120 s collective timeout
    again = subprocess.run(
        [sys.executable, "-m", "disttrain.cli", "trace", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert again.returncode == 0 and "rank 1 is behind" in again.stdout and where in again.stdout, again.stderr


def test_a_rank_holding_the_gil_is_found_by_faulthandler(tmp_path):
    """Rank 1 runs C code that never releases the GIL: its flight recorder's thread cannot answer, so the
    launcher signals it and faulthandler writes its stacks from C; the report still names rank 1 and its line."""
    config = tmp_path / "hang.yaml"
    text = YAML.format(dir=tmp_path / "run", backend="torch").replace(
        'loss: {target: "tests.cases.hang_step:step"}',
        'loss: {target: "tests.cases.hang_step:step", kwargs: {hold_gil: true}}',
    )
    config.write_text(text)
    proc = _run(config)
    out = proc.stdout + proc.stderr
    behind = [line for line in out.splitlines() if "BEHIND rank 1@" in line]
    assert proc.returncode != 0 and behind, out[-3000:]
    assert "faulthandler" in behind[0] and f"hang_step.py:{_hang_line('# HANG-GIL')} in step" in behind[0], out[-3000:]


def test_a_rank_stuck_in_a_filesystem_read_outside_collectives_is_named(tmp_path):
    """Rank 1 blocks in the kernel opening a FIFO nobody writes (a stuck filesystem), outside any
    collective: its peers wait in theirs, no collective finishes, and the report names rank 1 at that line."""
    fifo = tmp_path / "stuck.fifo"
    os.mkfifo(fifo, 0o600)
    config = tmp_path / "hang.yaml"
    text = YAML.format(dir=tmp_path / "run", backend="shm").replace(
        'loss: {target: "tests.cases.hang_step:step"}',
        f'loss: {{target: "tests.cases.hang_step:step", kwargs: {{fifo: "{fifo}"}}}}',
    )
    config.write_text(text)
    proc = _run(config)
    out = proc.stdout + proc.stderr
    behind = [line for line in out.splitlines() if "BEHIND rank 1@" in line]
    assert proc.returncode != 0 and behind, out[-3000:]
    assert f"hang_step.py:{_hang_line('# HANG-FS')} in step" in behind[0], out[-3000:]
