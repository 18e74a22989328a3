"""Recovery in place (``fault_tolerance.recover: in_place``): a host SIGKILLed under ddp and zero3 (network
namespaces as hosts, tests/test_fault_replicas.py's set-up); the survivor's worker process is kept: it
aborts the step in flight, rebuilds its communicator and strategy at world size 1 and resumes from the
copies in its agent's memory. Its PID is unchanged, nothing is read from disk, at most one step is lost,
and the run ends where a run resized at the same step from a disk checkpoint ends (same global batch).
"""

from __future__ import annotations

import os
import re

import pytest

from tests.support.host_loss import lose_host_1
from tests.support.resized import check_equals_resized_run, run_until
from tests.test_fault_replicas import RESUMED, TOL, _config, _run
from tests.test_launcher_elastic import _no_netns

pytestmark = pytest.mark.skipif(_no_netns() is not None, reason=f"multi-host tests skipped: {_no_netns()}")
MOVED = r"in place \(pid (\d+)\): .*lost rank 1@\S+; now rank 0 of 1, attempt 1"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("strategy", ["ddp", "zero3"])
def test_a_lost_host_is_recovered_in_place_and_equals_a_resized_run(tmp_path, strategy):
    steps = 120
    extra = ["checkpoint.every=0", "fault_tolerance.every=1", "fault_tolerance.recover=in_place"]
    run_yaml = _config(tmp_path, "run", strategy, steps, extra)
    loss = lose_host_1(["-m", "disttrain.worker", run_yaml], resumed=RESUMED)
    out, err, before, after = loss.out, loss.err, loss.before, loss.after
    assert loss.code == 0, loss.text
    moved = re.search(MOVED, out)
    assert moved and int(moved.group(1)) in before, loss.text
    assert after <= before, f"new processes on the survivor: {after - before}"  # no worker was started
    m = re.search(RESUMED, out)
    s = int(m.group(1))
    done_before = max(int(x) for x in re.findall(r"\] step (\d+)/", out[: m.start()]))
    print(f"{strategy} in place: resumed at step {s} ({done_before - s} step(s) lost), {loss.resumed_after:.1f}s")
    assert done_before - s <= 1, f"{done_before - s} steps lost"
    assert "resumed from /" not in out, "a disk checkpoint was read"
    assert re.search(r"round 1: .*lost \S+; world 2 -> 1", err), loss.text
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["latest", f"step_{steps:06d}"]

    ref_yaml = _config(tmp_path, "ref", strategy, steps, [f"checkpoint.every={s}"])
    check_equals_resized_run(tmp_path, ref_yaml, _run, f"{strategy} in place", steps, s, 2, 1, TOL, run_until)
