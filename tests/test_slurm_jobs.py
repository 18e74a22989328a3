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
"""
import glob
import os
import subprocess
import sys
import time

import pytest
import torch

from tests.equivalence import max_param_diff
from tests.harness import spawn
from tests.slurm_cluster import slurm_cluster  # noqa: F401  (the fixture)

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
    from launcher.slurm import expand_hostlist, scontrol_hostnames

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


@pytest.mark.timeout(400)
def test_srun_two_nodes_four_tasks_matches_one_process(slurm_cluster, reference, tmp_path):
    run_dir = tmp_path / "run"
    proc = slurm_cluster.run(["srun", "-N2", "-n4", "--kill-on-bad-exit=1", sys.executable, "-u", "-m",
                              "tests.cases.slurm_train", DIGITS, f"run.dir={run_dir}", *BASE],
                             check=False, timeout=360, cwd=ROOT, env=dict(slurm_cluster.env, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "done: 12 steps on 4 ranks" in proc.stdout
    saved, params = _params(run_dir)
    assert saved["step"] == 12
    diff = max_param_diff(reference, params)
    assert diff <= ATOL, f"srun -N2 -n4 differs from one process by {diff:.3g} (tolerance {ATOL})"


def _submit(cluster, run_dir, *extra) -> str:
    env = dict(cluster.env, DT_TEST_HOLD_STEP="4", OMP_NUM_THREADS="1")
    proc = cluster.run([sys.executable, "-m", "disttrain.cli", "submit", DIGITS, "--nodes", "2", "--ntasks-per-node",
                        "1", *extra, f"run.dir={run_dir}", *BASE, "checkpoint.every=0",
                        "slurm.worker_module=tests.cases.slurm_train"], cwd=ROOT, env=env, timeout=120)
    assert " as job " in proc.stdout, proc.stdout + proc.stderr
    return proc.stdout.split(" as job ")[1].split(":")[0]


@pytest.mark.timeout(560)
def test_preemption_by_signal_and_by_time_limit_requeues_and_resumes(slurm_cluster, reference, tmp_path):
    c = slurm_cluster
    # The time-limited job runs one agent per node (launcher.slurm_agent) that forwards the warning to its workers.
    limited = _submit(c, tmp_path / "limit", "--time", "1", "slurm.signal_seconds=50", "--mode", "agent")
    cancelled = _submit(c, tmp_path / "usr1")
    runs = {limited: tmp_path / "limit", cancelled: tmp_path / "usr1"}
    deadline = time.monotonic() + 500
    signalled, done = False, {}
    while len(done) < 2:
        assert time.monotonic() < deadline, {j: c.job(j) for j in runs} | {"logs": c.logs()}
        for job, run_dir in runs.items():
            if job in done:
                continue
            info = c.job(job)
            state = info.get("JobState")
            assert state not in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"), \
                f"job {job}: {info}\n{_out(run_dir)}"
            if state == "COMPLETED":
                done[job] = info
            elif state == "PENDING" and int(info.get("Restarts", 0)) >= 1 and info.get("Reason") == "BeginTime":
                # SLURM holds a requeued job ~2 minutes; release it (and lift the 1-minute limit:
                # this test is about the first attempt's limit, not a second one).
                c.run(["scontrol", "update", f"jobid={job}", "TimeLimit=10"], check=False)
                c.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=False)
        if not signalled and all((runs[cancelled] / f"held.{r}").exists() for r in (0, 1)):
            c.run(["scancel", "--signal=USR1", cancelled])  # to every task of the job's steps
            signalled = True
        time.sleep(0.3)

    results = {}
    for job, run_dir in runs.items():
        out = _out(run_dir)
        assert int(done[job]["Restarts"]) >= 1, done[job]
        assert "restart 0" in out and "restart 1" in out, out
        assert "preemption: SIGUSR1; all ranks stop after step" in out and "requeued job" in out, out
        assert "resumed from" in out and "done: 12 steps on 2 ranks" in out, out
        saved, params = _params(run_dir)
        assert saved["step"] == 12 and saved["restart"] >= 1
        for name in ("config.yaml", "summary.json", "metrics.jsonl", "loss.png", "checkpoints/latest"):
            assert (run_dir / name).exists(), name
        diff = max_param_diff(reference, params)
        assert diff <= ATOL, f"job {job}: resumed run differs from one process by {diff:.3g} (tolerance {ATOL})"
        results[job] = params
    diff = max_param_diff(results[limited], results[cancelled])
    assert diff <= EXACT, f"the two resumed runs differ by {diff:.3g} (tolerance {EXACT})"
