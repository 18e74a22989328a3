"""Full filesystems under a running job (small tmpfs mounts, root only): the log directory fills
up (the ranks keep running, the lost lines are counted and reported) and the checkpoint
directory fills up (the failed periodic save is logged, the previous checkpoint stays the resume
point, training goes on, and once there is room again the next save succeeds). The job ends
with exit 0 and a final checkpoint that verifies."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from disttrain import rundir
from disttrain.checkpoint import CheckpointReader
from disttrain.checkpoint.reader import list_checkpoints
from tests.support.harness import ROOT


def _mount_tmpfs(path: str, size: str) -> None:
    os.makedirs(path, mode=0o700, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", path], check=True)


@pytest.mark.timeout(300)
def test_full_log_and_checkpoint_filesystems_never_stop_or_hang_the_job(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    run = rundir.prepare(str(tmp_path / "run"))
    logs, ckpt = os.path.join(run, "logs"), os.path.join(run, "checkpoints")
    _mount_tmpfs(logs, "16k")
    _mount_tmpfs(ckpt, "1m")
    filler = os.path.join(ckpt, "filler")
    with open(filler, "wb") as f:  # leaves room for one checkpoint, not two
        f.write(b"\0" * (620 << 10))
    try:
        argv = [sys.executable, "-m", "disttrain.cli", "run", "configs/digits.yaml", f"run.dir={run}"]
        argv += ["train.steps=1000", "train.log_every=4", "train.eval_every=0", "checkpoint.every=20"]
        argv += ["checkpoint.keep=2"]
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        err_lines: list[str] = []
        freed = threading.Event()

        def read_stderr():
            for line in proc.stderr:
                err_lines.append(line)
                if "the next save retries" in line and not freed.is_set():
                    os.unlink(filler)  # room again: a later save must succeed
                    freed.set()

        t = threading.Thread(target=read_stderr, daemon=True)
        t.start()
        out = proc.stdout.read()
        proc.wait(240)
        t.join(30)
        err = "".join(err_lines)
        assert proc.returncode == 0, out[-2000:] + err[-4000:]
        assert freed.is_set(), err[-3000:]
        # The checkpoint disk: one save failed, logged; training went on; later saves worked.
        assert "saving checkpoint step" in err and "No space left on device" in err, err[-3000:]
        steps = [s for s, _ in list_checkpoints(ckpt)]
        assert steps and steps[0] == 1000, steps
        CheckpointReader(os.path.join(ckpt, "step_001000")).verify_all()
        assert not [n for n in os.listdir(ckpt) if n.startswith(".tmp-")]
        # The log disk: reported once when it filled, counted at the end; the console got everything.
        assert "writing" in err and "logs/rank_0/stdout.log failed (No space left on device)" in err, err[-3000:]
        assert "line(s) of output missing from" in err, err[-3000:]
        assert "step 1000/1000" in out and "done: 1000 steps" in out, out[-2000:]
    finally:
        for m in (logs, ckpt):
            subprocess.run(["umount", "-l", m], check=False)
