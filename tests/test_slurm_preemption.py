"""Preemption: a warning signal becomes one agreed stop step, a checkpoint, a requeue and exit 0.

The unit layer checks the callback's decisions on a one-rank communicator (when it is built,
what exit code the worker gets in each case after the stop); one test runs two real ranks
and signals one of them. test_slurm_jobs.py covers checkpoint, requeue and resume on a real
cluster.
"""

import csv
import json
import os
import signal

import pytest

import collectives
from collectives.env import DistEnv
from disttrain import config as config_mod
from disttrain.slurm.preemption import EX_TEMPFAIL, Preemption, build_callbacks
from tests.support.harness import spawn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs", "digits.yaml")


@pytest.fixture
def comm():
    c = collectives.init("shm", env=DistEnv(0, 1, 0, 1, None, None, "single"), timeout=10)
    yield c
    c.close()


@pytest.fixture
def outside_slurm(monkeypatch):
    for k in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(k)


@pytest.fixture
def in_slurm_job(outside_slurm, monkeypatch, tmp_path):
    """Inside job 9 with neither scontrol nor sbatch on PATH, so no requeue can succeed."""
    monkeypatch.setenv("SLURM_JOB_ID", "9")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("DISTTRAIN_SLURM_SCRIPT", raising=False)


def _stopped(comm, *overrides, checkpointing=True) -> Preemption:
    """A callback that has agreed to stop after step 5 (what on_step_end does after a signal)."""
    cfg = config_mod.load(DIGITS, list(overrides))
    cb = Preemption(cfg.slurm, comm, checkpointing=checkpointing)
    cb.stop_step = 5
    return cb


@pytest.mark.unit
def test_auto_mode_outside_slurm_builds_no_callback(comm, outside_slurm):
    assert build_callbacks(config_mod.load(DIGITS), comm) == []


@pytest.mark.unit
def test_preemption_on_installs_handlers_for_the_signal_and_sigterm(comm, outside_slurm):
    (cb,) = build_callbacks(config_mod.load(DIGITS, ["slurm.preemption=true", "slurm.signal=USR2"]), comm)
    try:
        assert cb.signals == sorted([signal.SIGUSR2, signal.SIGTERM])
        assert signal.getsignal(signal.SIGUSR2) == cb._on_signal
    finally:
        cb.uninstall()
    assert signal.getsignal(signal.SIGUSR2) != cb._on_signal


@pytest.mark.unit
def test_stop_outside_slurm_exits_0_with_nothing_to_requeue(comm, outside_slurm, capsys):
    assert _stopped(comm).finish(None) == 0
    assert "not under SLURM: nothing to requeue" in capsys.readouterr().out


@pytest.mark.unit
def test_stop_with_requeue_off_exits_0(comm, in_slurm_job, capsys):
    assert _stopped(comm, "slurm.requeue=false").finish(None) == 0
    assert "slurm.requeue is off" in capsys.readouterr().out


@pytest.mark.unit
def test_stop_without_checkpoints_is_not_requeued_and_says_why(comm, in_slurm_job, capsys):
    assert _stopped(comm, checkpointing=False).finish(None) == EX_TEMPFAIL
    assert "would start over; not requeueing. HINT" in capsys.readouterr().out


@pytest.mark.unit
def test_stop_after_max_requeues_is_not_requeued_again(comm, in_slurm_job, monkeypatch, capsys):
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    assert _stopped(comm, "slurm.max_requeues=3").finish(None) == EX_TEMPFAIL
    assert "already requeued 3 times" in capsys.readouterr().out


@pytest.mark.unit
def test_stop_that_cannot_requeue_keeps_the_checkpoint_and_exits_tempfail(comm, in_slurm_job, capsys):
    assert _stopped(comm).finish(None) == EX_TEMPFAIL
    out = capsys.readouterr().out
    assert "checkpoint of step 5 saved, but could not requeue job 9" in out and "HINT" in out, out


@pytest.mark.unit
def test_run_that_was_not_stopped_exits_0(comm, in_slurm_job):
    cb = _stopped(comm)
    cb.stop_step = None
    assert cb.finish(None) == 0


@pytest.mark.timeout(180)
def test_signal_to_one_rank_stops_all_at_one_step():
    results = spawn(
        "tests.cases.preempt:signal_one_rank",
        2,
        args={"config": DIGITS, "signal_rank": 1, "signal_step": 3},
        timeout=150,
    )
    stops = {r["stop_step"] for r in results}
    assert len(stops) == 1 and stops.pop() in (3, 4), results  # the next agreement after the signal
    assert all(r["steps"] == r["stop_step"] for r in results)
    assert [r["received"] for r in results] == [None, "SIGUSR1"]


@pytest.mark.timeout(180)
def test_stop_at_a_log_step_writes_that_step_once_with_its_evaluation(tmp_path):
    run_dir = tmp_path / "run"
    results = spawn(
        "tests.cases.preempt:stop_at_log_step",
        2,
        args={"config": DIGITS, "run_dir": str(run_dir), "signal_step": 3},
        timeout=150,
    )
    assert {r["stop_step"] for r in results} == {4}, results  # signalled after step 3, agreed at step 4 (a log step)
    with open(run_dir / "metrics.jsonl") as f:
        recs = [json.loads(line) for line in f if line.strip()]
    assert [r["step"] for r in recs] == [2, 4], recs  # once per step: no second line for the stop step
    assert "loss" in recs[-1] and "eval_loss" in recs[-1], recs[-1]  # the final evaluation joins that line
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [2, 4], rows
    assert rows[-1]["loss"] and rows[-1]["eval_loss"], rows[-1]
