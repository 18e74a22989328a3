"""SLURM's time-limit warning may come up to a minute early (its event resolution), while a worker is still
starting: its default action would kill set-up. Our agent (``launcher.slurm.agent``) starts workers with SIGUSR1/2
blocked and passes the signal on, so it waits, pending, until the worker's ``catch_signals_early`` catches it.

On a real cluster (two slurmd): each node's agent starts one worker that stands before its handler; the test
signals the job's tasks (the agents) with ``scancel --signal=USR1``; every worker must later catch SIGUSR1 and
exit 0, where an unheld signal would have killed it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(120)
def test_a_warning_before_the_workers_handler_waits_for_it(slurm_cluster, tmp_path):
    argv = ["srun", "-N2", "--ntasks-per-node=1", "--kill-on-bad-exit=0", sys.executable, "-m", "launcher.slurm.agent"]
    argv += ["--nproc-per-node", "1", "--secret-dir", str(tmp_path), "-m", "tests.cases.early_signal", str(tmp_path)]
    env = dict(slurm_cluster.env, PYTHONPATH=ROOT)
    p = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"started.{r}").exists() for r in (0, 1)):
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()[0]
            time.sleep(0.05)
        time.sleep(0.1)
        job = (tmp_path / "started.0").read_text()
        assert job, "the worker saw no SLURM_JOB_ID"
        slurm_cluster.run(["scancel", "--signal=USR1", job])
        (tmp_path / "signalled").touch()
        out, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0, out[-3000:]
    for r in (0, 1):
        assert (tmp_path / f"caught.{r}").read_text() == str(int(signal.SIGUSR1)), (r, out[-3000:])
