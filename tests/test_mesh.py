"""The mesh layout, stage balancing and pipeline schedules, without processes.

The multi-rank behaviour (groups, equivalence with one process) is in
tests/test_model_parallel.py; these are the local rules it rests on.
"""

from __future__ import annotations

import pytest

from disttrain.mesh import AXES, MeshError, MeshShape, resolve_shape
from disttrain.models.gpt import GPT
from disttrain.parallel.model_parallel import validate_layout
from disttrain.parallel.pipeline_parallel import SCHEDULES, balance_stages, check_stages

pytestmark = pytest.mark.timeout(60)


@pytest.mark.unit
@pytest.mark.parametrize("dims", [(2, 2, 1), (2, 1, 2), (1, 2, 2), (4, 1, 1), (1, 1, 4), (1, 4, 1), (2, 3, 1)])
def test_axis_groups_partition_the_world(dims):
    shape = MeshShape(*dims)
    for axis in AXES:
        groups = shape.axis_groups(axis)
        flat = sorted(r for g in groups for r in g)
        assert flat == list(range(shape.world_size)), f"{axis}: groups {groups} do not partition the world"
        for g in groups:  # members differ only in this axis's coordinate, ordered by it
            coords = [shape.coords(r) for r in g]
            assert [c[axis] for c in coords] == list(range(len(g)))
            for other in AXES:
                if other != axis:
                    assert len({c[other] for c in coords}) == 1
    assert [shape.rank_of(**shape.coords(r)) for r in range(shape.world_size)] == list(range(shape.world_size))


@pytest.mark.unit
def test_tp_peers_are_neighbours():
    assert MeshShape(2, 2, 1).axis_groups("tp") == [[0, 1], [2, 3]]
    assert MeshShape(2, 2, 1).axis_groups("dp") == [[0, 2], [1, 3]]


@pytest.mark.unit
def test_resolve_shape_fills_dp_and_explains_bad_layouts():
    assert resolve_shape(8, "auto", 2, 2) == MeshShape(2, 2, 2)
    with pytest.raises(MeshError, match=r"tp \(3\) x pp \(1\) = 3 does not divide the world size \(4\)[\s\S]*HINT"):
        resolve_shape(4, "auto", 3, 1)
    with pytest.raises(MeshError, match=r"= 8, but the world size is 4[\s\S]*HINT"):
        resolve_shape(4, 2, 2, 2)
    with pytest.raises(MeshError, match="tp=0"):
        resolve_shape(4, "auto", 0, 1)


@pytest.mark.unit
def test_model_that_does_not_divide_is_refused():
    model = GPT(70, n_layer=2, n_head=2, d_model=16, seq_len=8)
    validate_layout(model, MeshShape(2, 2, 1))
    with pytest.raises(MeshError, match=r"2 attention heads cannot be split across tp=4[\s\S]*HINT"):
        validate_layout(model, MeshShape(1, 4, 1))
    with pytest.raises(MeshError, match=r"2 blocks, fewer than pp=4[\s\S]*HINT"):
        validate_layout(model, MeshShape(1, 1, 4))
    with pytest.raises(MeshError, match=r"dropout[\s\S]*HINT"):
        validate_layout(GPT(70, n_layer=2, n_head=2, d_model=16, seq_len=8, dropout=0.1), MeshShape(2, 2, 1))


@pytest.mark.unit
def test_balance_stages_by_cost():
    assert balance_stages([1, 1, 1, 1], 2) == [[0, 1], [2, 3]]
    assert balance_stages([1, 1, 1, 1], 4) == [[0], [1], [2], [3]]
    # A heavy embedding on stage 0 pushes blocks to the later stages.
    assert balance_stages([1, 1, 1, 1], 2, first_extra=2) == [[0], [1, 2, 3]]
    with pytest.raises(MeshError, match="fewer than the stages"):
        balance_stages([1, 1], 3)
    assert check_stages([[0], [1, 2, 3]], 4, 2)
    with pytest.raises(MeshError, match="HINT"):
        check_stages([[0], [2, 3]], 4, 2)


def simulate(schedule: str, p: int, m: int, tf: float = 1.0, tb: float = 2.0) -> list[float]:
    """Run the per-stage action lists with their send/recv dependencies; return each stage's
    idle fraction. Raises if the schedule deadlocks."""
    acts = [list(SCHEDULES[schedule](s, p, m)) for s in range(p)]
    done: dict[tuple[str, int, int], float] = {}
    clock = [0.0] * p
    busy = [0.0] * p
    while any(acts):
        progressed = False
        for s in range(p):
            if not acts[s]:
                continue
            kind, i = acts[s][0]
            deps = [("F", s - 1, i)] if kind == "F" and s > 0 else []
            if kind == "B":
                deps = [("F", s, i)] + ([("B", s + 1, i)] if s < p - 1 else [])
            if all(d in done for d in deps):
                start = max([clock[s]] + [done[d] for d in deps])
                cost = tf if kind == "F" else tb
                clock[s] = done[(kind, s, i)] = start + cost
                busy[s] += cost
                acts[s].pop(0)
                progressed = True
        if not progressed:
            raise AssertionError(f"{schedule} deadlocks: next actions {[a[:1] for a in acts]}")
    total = max(clock)
    return [1 - b / total for b in busy]


@pytest.mark.unit
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p,m", [(2, 1), (2, 4), (4, 4), (4, 8), (3, 5)])
def test_schedules_have_the_formula_bubble(schedule, p, m):
    for s in range(p):
        acts = SCHEDULES[schedule](s, p, m)
        assert sorted(acts) == sorted([("F", i) for i in range(m)] + [("B", i) for i in range(m)])
        assert all(acts.index(("F", i)) < acts.index(("B", i)) for i in range(m))
    idle = simulate(schedule, p, m)
    formula = (p - 1) / (m + p - 1)
    assert sum(idle) / p == pytest.approx(formula, abs=1e-9)


@pytest.mark.unit
def test_1f1b_bounds_activations_in_flight():
    p, m = 4, 8
    for s in range(p):
        live = peak = 0
        for kind, _ in SCHEDULES["1f1b"](s, p, m):
            live += 1 if kind == "F" else -1
            peak = max(peak, live)
        assert peak <= p - s
    assert max(sum(1 for k, _ in SCHEDULES["gpipe"](0, p, m) if k == "F") for _ in [0]) == m
