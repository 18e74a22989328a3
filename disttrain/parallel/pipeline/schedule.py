"""Pipeline schedules: the order in which one pp rank runs forward (F) and backward (B)
of each (micro-batch, virtual chunk). Pure functions of (rank, p, m, v); every rank of the
pp group derives its own list, and together they never deadlock with asynchronous sends
and blocking receives (checked by simulation in tests/test_mesh.py).

* GPipe: all m forwards, then all m backwards; holds m micro-batches' activations.
* 1F1B: ``p - 1 - rank`` warm-up forwards, then one forward / one backward alternately,
  then the remaining backwards; holds at most p micro-batches' activations.
  Both idle each stage (p-1) slots of an (m+p-1)-slot step: bubble (p-1)/(m+p-1).
* Interleaved 1F1B (Megatron): each rank holds v chunks of the model (global stage
  ``chunk * p + rank``), so a micro-batch visits every rank v times and the bubble shrinks
  to (p-1)/(v*m+p-1). Needs m divisible by p.
"""

from __future__ import annotations

from collections.abc import Callable

from ..mesh import MeshError

Action = tuple[str, int, int]  # ("F" | "B", micro-batch, chunk)


def gpipe(rank: int, p: int, m: int, v: int = 1) -> list[Action]:
    return [("F", i, 0) for i in range(m)] + [("B", i, 0) for i in range(m)]


def one_f_one_b(rank: int, p: int, m: int, v: int = 1) -> list[Action]:
    warm = min(p - 1 - rank, m)
    acts = [("F", i, 0) for i in range(warm)]
    for i in range(m - warm):
        acts += [("F", warm + i, 0), ("B", i, 0)]
    return acts + [("B", i, 0) for i in range(m - warm, m)]


def interleaved_1f1b(rank: int, p: int, m: int, v: int = 2) -> list[Action]:
    total = m * v

    def unit(k: int, backward: bool) -> tuple[int, int]:
        chunk = (k // p) % v
        return (k // (p * v)) * p + k % p, (v - 1 - chunk) if backward else chunk

    warm = min((p - rank - 1) * 2 + (v - 1) * p, total)
    acts: list[Action] = [("F", *unit(k, False)) for k in range(warm)]
    for i in range(total - warm):
        acts += [("F", *unit(warm + i, False)), ("B", *unit(i, True))]
    return acts + [("B", *unit(k, True)) for k in range(total - warm, total)]


SCHEDULES: dict[str, Callable[[int, int, int, int], list[Action]]] = {
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
    "interleaved": interleaved_1f1b,
}


def build_schedule(name: str, rank: int, p: int, m: int, v: int) -> list[Action]:
    """This pp rank's actions for one step; MeshError (naming the key) for a bad combination."""
    if name not in SCHEDULES:
        raise MeshError(f"parallel.pipeline.schedule={name!r}; known: {', '.join(SCHEDULES)}")
    if name != "interleaved" and v != 1:
        raise MeshError(
            f"parallel.pipeline.virtual_stages={v} needs schedule: interleaved (got {name})"
            "\nHINT: set parallel.pipeline.schedule: interleaved, or virtual_stages: 1"
        )
    if name == "interleaved" and m % p:
        raise MeshError(
            f"parallel.pipeline: the interleaved schedule needs micro-batches ({m}) divisible by pp ({p})"
            f"\nHINT: set parallel.pipeline.microbatches to a multiple of {p}"
        )
    return SCHEDULES[name](rank, p, m, v)


def bubble_formula(p: int, m: int, v: int = 1) -> float:
    """Idle share of a step: (p-1)/(v*m+p-1)."""
    return (p - 1) / (v * m + p - 1)
