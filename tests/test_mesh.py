"""The mesh layout, stage balancing and pipeline schedules, without processes.

The multi-rank behaviour (groups, equivalence with one process) is in
tests/test_model_parallel.py; these are the local rules it rests on.
"""

from __future__ import annotations

import pytest

from disttrain.parallel.mesh import AXES, MeshError, MeshShape, resolve_shape
from disttrain.parallel.pipeline.schedule import SCHEDULES, bubble_formula, build_schedule
from disttrain.parallel.pipeline.split import balance

pytestmark = [pytest.mark.timeout(60), pytest.mark.unit]


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


def test_tp_peers_are_neighbours():
    assert MeshShape(2, 2, 1).axis_groups("tp") == [[0, 1], [2, 3]]
    assert MeshShape(2, 2, 1).axis_groups("dp") == [[0, 2], [1, 3]]


def test_resolve_shape_fills_dp_and_explains_bad_layouts():
    assert resolve_shape(8, "auto", 2, 2) == MeshShape(2, 2, 2)
    with pytest.raises(MeshError, match=r"tp \(3\) x pp \(1\) = 3 does not divide the world size \(4\)[\s\S]*HINT"):
        resolve_shape(4, "auto", 3, 1)
    with pytest.raises(MeshError, match=r"= 8, but the world size is 4[\s\S]*HINT"):
        resolve_shape(4, 2, 2, 2)
    with pytest.raises(MeshError, match="tp=0"):
        resolve_shape(4, "auto", 0, 1)


def test_balance_stages_by_cost():
    assert balance([1, 1, 1, 1], 2) == [0, 2]
    assert balance([1, 1, 1, 1], 4) == [0, 1, 2, 3]
    # A heavy embedding on stage 0 pushes blocks to the later stages.
    assert balance([3, 1, 1, 1], 2) == [0, 1]
    assert balance([1, 1, 1, 5], 2) == [0, 3]


def simulate(schedule: str, p: int, m: int, v: int = 1, tf: float = 1.0, tb: float = 2.0) -> list[float]:
    """Run the per-rank action lists with their send/recv dependencies (global stage
    g = chunk * p + rank; a chunk's compute costs 1/v of a whole stage's); return each rank's
    idle fraction. Raises if the schedule deadlocks."""
    acts = [list(build_schedule(schedule, r, p, m, v)) for r in range(p)]
    n = p * v
    done: dict[tuple[str, int, int], float] = {}
    clock = [0.0] * p
    busy = [0.0] * p
    while any(acts):
        progressed = False
        for r in range(p):
            if not acts[r]:
                continue
            kind, i, c = acts[r][0]
            g = c * p + r
            deps = [("F", g - 1, i)] if kind == "F" and g > 0 else []
            if kind == "B":
                deps = [("F", g, i)] + ([("B", g + 1, i)] if g < n - 1 else [])
            if all(d in done for d in deps):
                start = max([clock[r]] + [done[d] for d in deps])
                cost = (tf if kind == "F" else tb) / v
                clock[r] = done[(kind, g, i)] = start + cost
                busy[r] += cost
                acts[r].pop(0)
                progressed = True
        if not progressed:
            raise AssertionError(f"{schedule} deadlocks: next actions {[a[:1] for a in acts]}")
    total = max(clock)
    return [1 - b / total for b in busy]


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p,m", [(2, 1), (2, 4), (4, 4), (4, 8), (3, 5)])
def test_schedules_have_the_formula_bubble(schedule, p, m):
    for s in range(p):
        acts = SCHEDULES[schedule](s, p, m, 1)
        assert sorted(acts) == sorted([("F", i, 0) for i in range(m)] + [("B", i, 0) for i in range(m)])
        assert all(acts.index(("F", i, 0)) < acts.index(("B", i, 0)) for i in range(m))
    idle = simulate(schedule, p, m)
    assert sum(idle) / p == pytest.approx(bubble_formula(p, m), abs=1e-9)


@pytest.mark.parametrize("p,m,v", [(2, 2, 2), (2, 4, 2), (4, 4, 2), (4, 8, 2), (2, 4, 3), (3, 6, 2)])
def test_interleaved_never_deadlocks_and_has_the_formula_bubble(p, m, v):
    for r in range(p):
        acts = build_schedule("interleaved", r, p, m, v)
        want = [(k, i, c) for k in "FB" for i in range(m) for c in range(v)]
        assert sorted(acts) == sorted(want)
    idle = simulate("interleaved", p, m, v)
    assert sum(idle) / p == pytest.approx(bubble_formula(p, m, v), abs=1e-9)
    assert bubble_formula(p, m, v) < bubble_formula(p, m, 1)


def test_bad_schedule_combinations_are_refused():
    with pytest.raises(MeshError, match=r"virtual_stages=2 needs schedule: interleaved[\s\S]*HINT"):
        build_schedule("1f1b", 0, 2, 4, 2)
    with pytest.raises(MeshError, match=r"micro-batches \(3\) divisible by pp \(2\)[\s\S]*HINT"):
        build_schedule("interleaved", 0, 2, 3, 2)
    with pytest.raises(MeshError, match="known: gpipe, 1f1b, interleaved"):
        build_schedule("zigzag", 0, 2, 4, 1)


def test_1f1b_bounds_activations_in_flight():
    p, m = 4, 8
    for s in range(p):
        live = peak = 0
        for kind, _, _ in SCHEDULES["1f1b"](s, p, m, 1):
            live += 1 if kind == "F" else -1
            peak = max(peak, live)
        assert peak <= p - s
    assert sum(1 for k, _, _ in SCHEDULES["gpipe"](0, p, m, 1) if k == "F") == m
