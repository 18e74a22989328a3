"""The membership rules, single process: ``--nnodes`` parsing and the quorum of the next round."""

import pytest

from launcher.errors import LaunchConfigError
from launcher.membership import NodesRange, Transition, format_transitions, next_members

pytestmark = pytest.mark.unit


def test_nnodes_spellings():
    assert NodesRange.parse("2") == NodesRange(2, 2) and not NodesRange.parse(2).elastic
    assert NodesRange.parse("1:3") == NodesRange(1, 3) and NodesRange.parse("1:3").elastic
    assert str(NodesRange(2, 4)) == "2:4" and str(NodesRange(3, 3)) == "3"
    for bad in ("0", "3:2", "a:b", "1:", ""):
        with pytest.raises(LaunchConfigError, match="--nnodes"):
            NodesRange.parse(bad)


def test_the_side_with_half_or_more_goes_on_above_min():
    assert next_members([0, 1, 2], [2], [], NodesRange(2, 3)) == ([0, 1], "")
    assert next_members([0, 1], [1], [], NodesRange(1, 2)) == ([0], "")
    nodes, why = next_members([0, 1, 2], [1, 2], [], NodesRange(1, 3))
    assert nodes == [] and "no quorum: 1 of the round's 3 hosts" in why
    nodes, why = next_members([0, 1], [1], [], NodesRange(2, 2))
    assert nodes == [] and "fewer than the minimum of 2" in why


def test_hosts_that_come_back_join_up_to_max():
    assert next_members([0], [], [1], NodesRange(1, 2)) == ([0, 1], "")
    assert next_members([0, 2], [], [1], NodesRange(1, 2)) == ([0, 2], "")  # members before newcomers
    assert next_members([0, 1], [1], [2], NodesRange(1, 3)) == ([0, 2], "")


def test_transitions_round_trip_and_read_as_a_list():
    t = Transition(1, "host b lost", ["b"], [], 4, 2, 100.0, 6.5)
    assert Transition.from_json(t.to_json()) == t
    text = format_transitions([t, Transition(2, "host b came back", [], ["b"], 2, 4, 200.0, 7.0)], "job")
    assert "2 membership transition(s)" in text
    assert "round 1: host b lost; lost b; world 4 -> 2; 6.5s" in text
    assert "round 2: host b came back; joined b; world 2 -> 4; 7.0s" in text
    stop = Transition(1, "host b lost; stopping: no quorum", ["b", "c"], [], 6, 0, 0.0)
    assert stop.describe() == "after round 0: host b lost; stopping: no quorum; lost b, c; the job stopped"


def test_launch_flags_reach_the_node_and_the_job(monkeypatch):
    from launcher.cli import build_parser, job_from_args, spec_from_args

    monkeypatch.setenv("DISTTRAIN_JOB_SECRET", "ab" * 32)
    ns = build_parser().parse_args(
        ["--nnodes", "1:3", "--node-rank", "2", "--rdzv-endpoint", "n0:29400", "--heartbeat-timeout", "2", "t.py"]
    )
    _, node = spec_from_args(ns)
    assert (node.nnodes, node.min_nodes, node.heartbeat_timeout) == (3, 1, 2.0)
    job = job_from_args(build_parser().parse_args(["--nnodes", "2:3", "--hosts", "a:1,b:1,c:1", "t.py"]))
    assert job.min_nodes == 2
    with pytest.raises(LaunchConfigError, match="--nnodes 1:2 but 3 host"):
        job_from_args(build_parser().parse_args(["--nnodes", "1:2", "--hosts", "a:1,b:1,c:1", "t.py"]))
    with pytest.raises(LaunchConfigError, match="--heartbeat-timeout must be positive"):
        job_from_args(build_parser().parse_args(["--heartbeat-timeout", "0", "--hosts", "a:1", "t.py"]))
