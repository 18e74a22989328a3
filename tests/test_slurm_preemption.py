"""The agreed stop step on real ranks, no SLURM needed: a signal to one rank stops all after one step.

test_slurm_jobs.py covers the rest of preemption (checkpoint, requeue, resume) on a real cluster.
"""

import os

import pytest

from tests.support.harness import spawn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs", "digits.yaml")


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
