"""What each rank's peer copy holds and where (``disttrain.fault.plan.copy_plan``; single process, pure).

- ddp, one rank per host: every box is replicated on every host, so each rank keeps the whole state
  for its own host's agent and sends no byte of it to another host.
- Several ranks per host: each replicated box is kept once per host, the bytes balanced between them.
- Own shards (zero3) and boxes held on fewer hosts than a copy lives on go as the write plan says,
  and then every box does (a rank that sends shards anyway would stage its own ones twice).
"""

from __future__ import annotations

import json

import pytest

from disttrain.checkpoint.write_plan import plan_writes
from disttrain.fault.plan import copy_plan

pytestmark = pytest.mark.unit


def rep(name: str, n: int) -> list:
    return [name, [[0, n]], False, 4 * n, True]


def own(name: str, a: int, b: int) -> list:
    return [name, [[a, b]], True, 4 * (b - a), False]


def plans(sigs: list, nodes: list[int], replicas: int = 1) -> list[tuple[list[int], list[int]]]:
    return [copy_plan(sigs, nodes, r, len(set(nodes)), replicas) for r in range(len(sigs))]


def boxes(sigs, r, idx) -> set[str]:
    return {json.dumps(sigs[r][i][:3]) for i in idx}


def test_ddp_one_rank_per_host_keeps_everything_at_home_and_sends_nothing():
    sig = [rep("w", 1000), rep("b", 10), rep("optim.w.exp_avg", 1000)]
    for hosts in (2, 3):
        for replicas in range(1, hosts):
            out = plans([sig] * hosts, list(range(hosts)), replicas)
            for remote, extra in out:
                assert remote == []  # no replicated byte leaves its host
                assert sorted(extra) == [0, 1, 2]  # each host's agent holds the whole state


def test_several_ranks_per_host_keep_each_box_once_per_host_balanced():
    sig = [rep(f"p{i}", 100 + i) for i in range(8)]
    nodes = [0, 0, 1, 1]
    out = plans([sig] * 4, nodes)
    for host in (0, 1):
        ranks = [r for r in range(4) if nodes[r] == host]
        kept = [boxes([sig] * 4, r, out[r][1]) for r in ranks]
        assert kept[0].isdisjoint(kept[1]) and len(kept[0] | kept[1]) == 8  # once per host, all of it
        assert abs(len(kept[0]) - len(kept[1])) <= 1
    assert all(remote == [] for remote, _ in out)


def test_own_shards_and_boxes_on_too_few_hosts_go_as_the_write_plan_says():
    # zero3: own flat shards; plus a replicated box that only host 0's ranks hold (a tp group's, say)
    sigs = [[own("w", 0, 50), rep("only0", 7)], [own("w", 50, 100), rep("only0", 7)], [own("w", 100, 150)]]
    nodes = [0, 0, 1]
    raw = [json.dumps(s).encode() for s in sigs]
    for r, (remote, extra) in enumerate(plans(sigs, nodes)):
        assert remote == plan_writes(sigs[r], r, lambda _b: raw)  # as the disk checkpoint writes them
        assert extra == []
    # replicas=2 on 3 hosts: a box on 2 of them is not enough to stay home either
    sigs = [[rep("w", 10)]] * 3 + [[own("x", 0, 4)]]
    out = plans(sigs, [0, 1, 1, 2], replicas=2)
    assert all(extra == [] for _, extra in out)
    assert sum(len(remote) for remote, _ in out[:3]) == 1  # written once, by one holder, to 3 hosts


def test_a_layout_with_own_shards_keeps_no_box_home():
    # zero3 with a small replicated box every rank holds (a buffer, say): no host-local part at all
    sigs = [[own("w", 0, 50), rep("buf", 3)], [own("w", 50, 100), rep("buf", 3)]]
    raw = [json.dumps(s).encode() for s in sigs]
    for r, (remote, extra) in enumerate(plans(sigs, [0, 1])):
        assert remote == plan_writes(sigs[r], r, lambda _b: raw) and extra == []
