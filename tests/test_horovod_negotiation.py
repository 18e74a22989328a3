"""The agreement table and the launcher-variable reading of disttrain.horovod, in one process:
rows as every member would contribute them, folded by ``Table.absorb``."""

from __future__ import annotations

import pytest
import torch

from disttrain.horovod.basics import read_env
from disttrain.horovod.exceptions import HorovodError
from disttrain.horovod.negotiation import JOINED, Announcement, Table, mismatch_message, row_of
from disttrain.horovod.wire import Kind, digest, fuse_key, split_key

pytestmark = pytest.mark.unit
SLOTS = 4


def ann(name: str, sig: str = "s", kind: Kind = Kind.ALLREDUCE, aux: int = 3) -> Announcement:
    return Announcement(digest(name), digest(sig), fuse_key(kind, torch.float32, 1, (1.0, 1.0)), aux)


def rows(*per_rank, clock: int = 0, flags=None) -> list[list[int]]:
    flags = flags or [0] * len(per_rank)
    return [row_of(f, clock, list(a), SLOTS)[: 4 + 4 * len(a)] for f, a in zip(flags, per_rank)]


def table(size: int = 2, fail_s: float = 10.0) -> Table:
    return Table(size, stall_warn_s=5.0, stall_fail_s=fail_s)


def test_names_in_different_orders_become_ready_in_one_order():
    t = table()
    v = t.absorb(rows([ann("a"), ann("b")], [ann("b")]))
    assert [r.name for r in v.ready] == [digest("b")]
    v = t.absorb(rows([], [ann("a")]))
    assert [r.name for r in v.ready] == [digest("a")] and t.pending() == 0


def test_ready_order_is_first_sight_not_arrival_per_rank():
    t = table()
    v = t.absorb(rows([ann("x"), ann("y"), ann("z")], [ann("z"), ann("y"), ann("x")]))
    assert [r.name for r in v.ready] == [digest("x"), digest("y"), digest("z")]


def test_different_signatures_fail_everywhere():
    t = table()
    v = t.absorb(rows([ann("a", "shape2")], [ann("a", "shape3")]))
    assert v.ready == [] and [(f.name, f.message) for f in v.failed] == [(digest("a"), None)]


def test_join_answers_allreduce_and_refuses_allgather():
    t = table()
    v = t.absorb(rows([], [ann("g", kind=Kind.ALLGATHER), ann("r")], flags=[JOINED, 0]))
    assert [r.name for r in v.ready] == [digest("r")] and v.ready[0].aux == [None, 3]
    assert "Allgather is not supported with Join" in v.failed[0].message
    assert v.join_done is None
    v = t.absorb(rows([], [], flags=[JOINED, JOINED]))
    assert v.join_done == 1  # joined last


def test_stall_is_reported_with_the_missing_ranks_then_fails():
    t = table(size=3, fail_s=10.0)
    t.absorb(rows([ann("lonely")], [], [], clock=0))
    v = t.absorb(rows([], [], [], clock=6000))
    assert [(s.name, s.missing) for s in v.stalled] == [(digest("lonely"), [1, 2])] and not v.failed
    v = t.absorb(rows([], [], [], clock=7000))
    assert v.stalled == []  # warned once
    v = t.absorb(rows([], [], [], clock=10_500))
    assert v.failed[0].missing == [1, 2] and t.pending() == 0


def test_fuse_key_round_trips_kind_dtype_and_op():
    assert split_key(fuse_key(Kind.ADASUM, torch.float64, 2, (0.5, 2.0))) == (Kind.ADASUM, torch.float64, 2)
    assert fuse_key(Kind.ALLREDUCE, torch.float32, 0, (1.0, 1.0)) != fuse_key(
        Kind.ALLREDUCE, torch.float32, 0, (2.0, 1.0)
    )


def test_mismatch_message_in_horovods_words():
    base = {"kind": "ALLREDUCE", "dtype": "float32", "shape": [2], "op": "Sum", "scales": [1.0, 1.0], "root": -1}
    msg = mismatch_message({0: base, 1: {**base, "shape": [3]}}, [4, 5])
    assert msg.startswith("Mismatched ALLREDUCE tensor shapes: One rank sent a tensor of shape [2]")
    assert "rank 4:" in msg and "rank 5:" in msg
    assert "Mismatched data types" in mismatch_message({0: base, 1: {**base, "dtype": "float64"}}, [0, 1])
    assert "root ranks" in mismatch_message({0: {**base, "root": 0}, 1: {**base, "root": 1}}, [0, 1])


def test_horovod_launcher_variables_give_the_rank():
    env = read_env({"HOROVOD_RANK": "2", "HOROVOD_SIZE": "4", "HOROVOD_LOCAL_RANK": "0", "HOROVOD_LOCAL_SIZE": "2"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (2, 4, 0, 2)


def test_disagreeing_launcher_variables_are_refused():
    with pytest.raises(HorovodError, match="HOROVOD_RANK=1"):
        read_env({"RANK": "0", "WORLD_SIZE": "2", "HOROVOD_RANK": "1", "HOROVOD_SIZE": "2"})
