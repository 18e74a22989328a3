"""On a real SLURM (tests/slurm_cluster.py: slurmctld + 2 slurmd nodes on this host).

* ``srun -N2 -n4`` runs the digits job; it matches one process (tolerance 2e-5 absolute on
  every parameter after 12 AdamW steps, as in test_trainer_equivalence: only the float32
  summation order of the gradient differs).
* ``disttrain submit`` jobs preempted twice over: one by ``scancel --signal=USR1``, one by
  its time limit (``--time=1`` with ``--signal=B:USR1@50``: the batch shell forwards the
  warning to srun, which started one agent per node: ``--mode agent``, the agents pass it
  on to their workers). Each saves a checkpoint, requeues itself (SLURM_RESTART_COUNT 0 -> 1),
  resumes and finishes; its run directory is complete and its final parameters equal the
  other's to 1e-6 (they stopped at different steps: a resume is exact) and one process's
  to 2e-5. The test worker (tests/cases/slurm_train.py) holds the first attempt at step 4
  until the signal arrives, so the signal never races the end of training.

All three jobs start together (the ``jobs`` fixture) while the one-process reference
trains; a driver thread signals, releases requeued jobs and lifts the time limit of a
requeued one, so the tests only wait for their job.
"""

import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from tests.support.equivalence import max_param_diff
from tests.support.harness import spawn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs", "digits.yaml")
BASE = ["train.steps=12", "train.log_every=4", "train.eval_every=0", "schedule.warmup_steps=3"]
ATOL = 2e-5  # N ranks vs one process
EXACT = 1e-6  # a resumed run vs another layout-identical run


@pytest.fixture(scope="module")
def reference():
    (r,) = spawn("tests.cases.train:train_case", 1, args={"config": DIGITS, "overrides": BASE}, timeout=200)
    return r["params"]


def _params(run_dir) -> dict:
    saved = torch.load(os.path.join(run_dir, "params.pt"))
    return saved, {n: p.reshape(-1).tolist() for n, p in saved["params"].items()}


def _out(run_dir) -> str:
    return "\n".join(open(f).read() for f in glob.glob(os.path.join(run_dir, "slurm", "*.out")))


@pytest.mark.timeout(60)
def test_hostlist_parser_agrees_with_scontrol(slurm_cluster):
    from launcher.slurm.hostlist import expand_hostlist, scontrol_hostnames

    for nodelist in ("n[1-2]", "gpu[001-003,010],login", "rack[1-2]-n[08-10]", "a[9-11],c,d[7]"):
        theirs = slurm_cluster.run(["scontrol", "show", "hostnames", nodelist]).stdout.split()
        assert expand_hostlist(nodelist) == theirs, nodelist
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = slurm_cluster.conf
    try:
        assert scontrol_hostnames("n[1-2]") == ["n1", "n2"]
    finally:
        if old is None:
            del os.environ["SLURM_CONF"]
        else:
            os.environ["SLURM_CONF"] = old


def _submit(cluster, run_dir, *extra) -> str:
    env = dict(cluster.env, DT_TEST_HOLD_STEP="4", OMP_NUM_THREADS="1")
    proc = cluster.run(
        [
            sys.executable,
            "-m",
            "disttrain.cli",
            "submit",
            DIGITS,
            "--nodes",
            "2",
            "--ntasks-per-node",
            "1",
            *extra,
            f"run.dir={run_dir}",
            *BASE,
            "checkpoint.every=0",
            "slurm.worker_module=tests.cases.slurm_train",
        ],
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    assert " as job " in proc.stdout, proc.stdout + proc.stderr
    return proc.stdout.split(" as job ")[1].split(":")[0]


class _Driver(threading.Thread):
    """Plays SLURM's operator: USR1 once the held job waits, releases requeued jobs at once."""

    def __init__(self, cluster, held_job: str, held_dir, jobs: list[str]):
        super().__init__(daemon=True)
        self.c, self.held_job, self.held_dir, self.jobs = cluster, held_job, held_dir, jobs
        self.stop, self.signalled, self.error = threading.Event(), False, None
        self.released: set[tuple[str, int]] = set()

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                for job in self.jobs:
                    info = self.c.job(job)
                    restarts = int(info.get("Restarts", 0))
                    if (
                        info.get("JobState") == "PENDING"
                        and info.get("Reason") == "BeginTime"
                        and restarts >= 1
                        and (job, restarts) not in self.released
                    ):
                        # SLURM holds a requeued job ~2 minutes; release it (once per requeue: the begin time
                        # we set lies ahead), and lift the 1-minute limit: the test is about the first
                        # attempt's limit, not a second one.
                        self.c.run(["scontrol", "update", f"jobid={job}", "TimeLimit=10"], check=False)
                        self.c.release(job)
                        self.released.add((job, restarts))
                if not self.signalled and all((self.held_dir / f"held.{r}").exists() for r in (0, 1)):
                    self.c.run(["scancel", "--signal=USR1", self.held_job])  # every task of the job's steps
                    self.signalled = True
                self.stop.wait(0.3)
        except Exception as exc:  # reported by the test that waits
            self.error = exc


@pytest.fixture(scope="module")
def jobs(slurm_cluster, tmp_path_factory):
    c, base = slurm_cluster, tmp_path_factory.mktemp("slurm-jobs")
    srun_dir = base / "srun"
    srun = subprocess.Popen(
        [
            "srun",
            "-N2",
            "-n4",
            "--kill-on-bad-exit=1",
            sys.executable,
            "-u",
            "-m",
            "tests.cases.slurm_train",
            DIGITS,
            f"run.dir={srun_dir}",
            *BASE,
        ],
        cwd=ROOT,
        env=dict(c.env, OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    # The time-limited job runs one agent per node (launcher.slurm.agent) that forwards the warning to its workers.
    # It also keeps peer replicas on: its agents run replica stores, but a requeued job's agents are new
    # (the copies died with the allocation), so it must resume from the disk checkpoint and say why.
    limited = _submit(
        c, base / "limit", "--time", "1", "slurm.signal_seconds=50", "fault_tolerance.every=1", "--mode", "agent"
    )
    cancelled = _submit(c, base / "usr1")
    driver = _Driver(c, cancelled, base / "usr1", [limited, cancelled])
    driver.start()
    try:
        yield {
            "srun": (srun, srun_dir),
            "limited": (limited, base / "limit"),
            "cancelled": (cancelled, base / "usr1"),
            "driver": driver,
        }
    finally:
        driver.stop.set()
        driver.join(10)
        if srun.poll() is None:
            os.killpg(srun.pid, signal.SIGKILL)
        srun.communicate()


@pytest.mark.timeout(400)
def test_srun_two_nodes_four_tasks_matches_one_process(jobs, reference):
    srun, run_dir = jobs["srun"]
    out, err = srun.communicate(timeout=360)
    assert srun.returncode == 0, out[-3000:] + err[-5000:]
    assert "done: 12 steps on 4 ranks" in out
    saved, params = _params(run_dir)
    assert saved["step"] == 12
    diff = max_param_diff(reference, params)
    assert diff <= ATOL, f"srun -N2 -n4 differs from one process by {diff:.3g} (tolerance {ATOL})"


def _wait_done(c, driver, job: str, run_dir, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        assert driver.error is None, driver.error
        info = c.job(job)
        state = info.get("JobState")
        assert state not in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"), (
            f"job {job}: {info}\n{_out(run_dir)}\n{c.logs(tail=80)}"
        )
        if state == "COMPLETED":
            return info
        assert time.monotonic() < deadline, (
            f"job {job} not done after {timeout:g}s: {info}\n{_out(run_dir)}\n{c.logs()}"
        )
        time.sleep(0.3)


@pytest.mark.timeout(500)
def test_preemption_by_signal_and_by_time_limit_requeues_and_resumes(slurm_cluster, jobs, reference):
    results = {}
    for key in ("cancelled", "limited"):
        job, run_dir = jobs[key]
        info = _wait_done(slurm_cluster, jobs["driver"], job, run_dir, 450)
        out = _out(run_dir)
        assert int(info["Restarts"]) >= 1, info
        assert "restart 0" in out and "restart 1" in out, out
        assert "preemption: SIGUSR1; all ranks stop after step" in out and "requeued job" in out, out
        assert re.search(r"resumed from /\S+/step_\d+", out) and "done: 12 steps on 2 ranks" in out, out
        if key == "limited":  # agents with replica stores; the requeued job's are new, its copies gone
            assert re.search(r"resumed from /\S+/step_\d+; no complete copy in peer memory", out), out
            assert "peer replicas: " in out and "resumed from peer memory" not in out, out
        else:
            assert "peer memory" not in out, out
        saved, params = _params(run_dir)
        assert saved["step"] == 12 and saved["restart"] >= 1
        for name in ("config.yaml", "summary.json", "metrics.jsonl", "loss.png", "checkpoints/latest"):
            assert (run_dir / name).exists(), name
        diff = max_param_diff(reference, params)
        assert diff <= ATOL, f"{key} job {job}: resumed run differs from one process by {diff:.3g} (tolerance {ATOL})"
        results[key] = params
    diff = max_param_diff(results["limited"], results["cancelled"])
    assert diff <= EXACT, f"the two resumed runs differ by {diff:.3g} (tolerance {EXACT})"


@pytest.mark.timeout(120)
def test_requeue_falls_back_to_resubmitting_the_script(slurm_cluster, tmp_path, monkeypatch):
    from launcher.slurm.errors import SlurmEnvError
    from launcher.slurm.requeue import requeue

    script = tmp_path / "job.sbatch"
    script.write_text(f"#!/bin/bash\n#SBATCH --output={tmp_path}/%A_%a.out\ntrue\n")
    monkeypatch.setenv("SLURM_CONF", slurm_cluster.conf)
    # scontrol refuses (no such job): resubmit, only the array task.
    done = requeue("99999_3", "3", str(script))
    assert "resubmitted" in done and "sbatch" in done, done
    new = done.split(" as job ")[1].split(" ")[0]
    assert slurm_cluster.job(new).get("ArrayTaskId") == "3", slurm_cluster.job(new)
    # scontrol missing from PATH: the same fallback; with no script either, a clear error.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").symlink_to(shutil.which("sbatch"))
    monkeypatch.setenv("PATH", str(bin_dir))
    assert "resubmitted" in requeue("99999", None, str(script))
    with pytest.raises(SlurmEnvError, match="scontrol: not installed; no batch script.*HINT"):
        requeue("99999", None, None)
