"""Recovery in place under tensor parallelism: 2 hosts x 2 workers (network namespaces), dp2 x tp2 with
``fault_tolerance.recover: in_place``; host 1 SIGKILLed (agent and workers) mid-run. The survivor's two
worker processes are kept: each aborts the step in flight, rebuilds its communicator, device mesh and tp
groups at world size 2 (tp2, dp1) and loads the tp shards of all four old ranks from the copies in its
agent's memory. Both PIDs are unchanged, nothing is read from disk, at most one step is lost, and the
run ends where a run that changed from four ranks to two at the same step through a disk checkpoint ends.
"""

from __future__ import annotations

import re

import pytest

from tests.support.host_loss import lose_host_1
from tests.test_fault_layouts import LAYOUTS, RESUMED, _check_resumed_from_memory, _config, _equals_resized_run
from tests.test_launcher_elastic import _no_netns

pytestmark = pytest.mark.skipif(_no_netns() is not None, reason=f"multi-host tests skipped: {_no_netns()}")
MOVED = r"in place \(pid (\d+)\): .*lost rank [23]@\S+.*; now rank ([01]) of 2, attempt 1"


@pytest.mark.timeout(300)
def test_a_host_lost_under_tp2_is_recovered_in_place(tmp_path):
    steps, mesh = 60, LAYOUTS["tp2"]
    extra = [*mesh, "checkpoint.every=0", "fault_tolerance.every=1", "fault_tolerance.recover=in_place"]
    run_yaml = _config(tmp_path, "run", steps, extra)
    loss = lose_host_1(["-m", "disttrain.worker", run_yaml], resumed=RESUMED, nproc=2)
    out, err, before, after = loss.out, loss.err, loss.before, loss.after
    assert loss.code == 0, loss.text
    moved = re.findall(MOVED, out)
    assert sorted(r for _, r in moved) == ["0", "1"], loss.text  # both workers moved, to ranks 0 and 1
    assert all(int(pid) in before for pid, _ in moved), loss.text
    assert after <= before, f"new processes on the survivor: {after - before}"  # no worker was started
    s = _check_resumed_from_memory(tmp_path, "tp2 in place", out, err, steps, "4 -> 2", loss.resumed_after)
    _equals_resized_run(tmp_path, "tp2 in place", mesh, steps, s, 4, 2)
