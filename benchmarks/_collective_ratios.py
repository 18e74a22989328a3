"""The ratios ``benchmarks/collectives.py`` prints and writes: each goal ratio from its rows (peer time over
ours, or ours over memcpy), paired figures as the median over turns of rows measured in turns, and each
goal's verdict. Kept apart from the rows' producers: this is the arithmetic the goals are stated in."""

from __future__ import annotations

import statistics

from benchmarks._common import human_bytes

SMALL_OPS = ("allgather", "broadcast", "reduce_scatter", "all_to_all", "sendrecv")
SMALL_SIZES = [64, 4 << 10]


# ratio -> (comparison, goal), from issue 17; "_plain"/"_direct" variants and the checked mpi/torch
# ratios are printed for diagnosis, without a goal
TARGETS = {
    "shm_vs_mpi_allreduce_4KiB": (">=", 0.5),
    "shm_vs_mpi_allreduce_4KiB_4ranks": (">=", 0.5),
    "shm_allgather_vs_mpi_4KiB_4ranks": (">=", 0.5),
    "mpi_backend_vs_mpi4py_4KiB": (">=", 0.7),
    "torch_backend_vs_gloo_4KiB": (">=", 0.7),
    "shm_vs_gloo_allreduce_64MiB": (">=", 5.0),
    "shm_vs_mpi_allreduce_64MiB": (">=", 3.0),
    "shm_time_over_memcpy_64MiB": ("<=", 2.5),
    "check_overhead_shm_64KiB": ("<=", 0.03),
}


def ratios(rows: list[dict], rounds: list[dict] = ()) -> dict:
    """Ratios from the best rows; ``rounds``: each round's rows by (row, op, bytes, ranks), for paired figures."""
    t = {(r["row"], r["op"], r["bytes"], r["ranks"]): r["best"] for r in rows}
    out = {}
    k4, k64, m64 = 4 << 10, 64 << 10, 64 << 20

    def put(name, num, den):
        if num in t and den in t:
            out[name] = round(t[num] / t[den], 3)

    for label, size in (("64MiB", m64), ("4KiB", k4)):
        for suffix, ours in (("", "shm zero-copy"), ("_plain", "shm"), ("_direct", "shm direct")):
            mine = (ours, "allreduce", size, 2)
            put(f"shm_vs_gloo_allreduce_{label}{suffix}", ("gloo", "allreduce", size, 2), mine)
            put(f"shm_vs_mpi_allreduce_{label}{suffix}", ("mpi4py+MPICH", "allreduce", size, 2), mine)
            put(f"shm_time_over_memcpy_{label}{suffix}", mine, ("memcpy", "memcpy", size, 1))
    for world in (4, 8):
        for suffix, ours in (("", "shm zero-copy"), ("_plain", "shm"), ("_direct", "shm direct")):
            put(
                f"shm_vs_mpi_allreduce_4KiB_{world}ranks{suffix}",
                ("mpi4py+MPICH", "allreduce", k4, world),
                (ours, "allreduce", k4, world),
            )
        put(
            f"shm_allgather_vs_mpi_4KiB_{world}ranks",
            ("mpi4py+MPICH", "allgather", k4, world),
            ("shm", "allgather", k4, world),
        )

    def turn_median(num, den) -> float | None:
        """The median over every turn of every round of num/den, for two rows measured in turns (each pair
        back to back); None without such rows. A latency with modes (gloo's) or a drift of the machine makes
        the ratio of two bests a draw; the turn-by-turn median compares like with like."""
        pairs = []
        for rnd in rounds:
            a, b = rnd.get(num), rnd.get(den)
            if a and b and a.get("times") and b.get("times"):
                pairs += [x / y for x, y in zip(a["times"], b["times"])]
        return statistics.median(pairs) if pairs else None

    def in_turns(name, num, den):
        """A goal ratio of rows measured in turns: their turn median (the ratio of bests goes to ``<name>_best``)."""
        med = turn_median(num, den)
        if med is None:
            put(name, num, den)
        else:
            put(f"{name}_best", num, den)
            out[name] = round(med, 3)

    for label, size in (("4KiB", k4), ("64MiB", m64)):
        # the raw library checks nothing: the goal compares our unchecked path; the checked one adds a collective.
        # The raw calls made in the same processes, in turns with ours, when that row exists (mpiexec's otherwise).
        raw = ("mpi4py same job", "allreduce", size, 2)
        if raw in t:
            in_turns(f"mpi_backend_vs_mpi4py_{label}", raw, ("mpi nocheck", "allreduce", size, 2))
        else:
            put(
                f"mpi_backend_vs_mpi4py_{label}",
                ("mpi4py+MPICH", "allreduce", size, 2),
                ("mpi nocheck", "allreduce", size, 2),
            )
        put(
            f"mpi_backend_vs_mpiexec_mpi4py_{label}",
            ("mpi4py+MPICH", "allreduce", size, 2),
            ("mpi nocheck", "allreduce", size, 2),
        )
        put(
            f"mpi_backend_checked_vs_mpi4py_{label}",
            ("mpi4py+MPICH", "allreduce", size, 2),
            ("mpi", "allreduce", size, 2),
        )
        in_turns(
            f"torch_backend_vs_gloo_{label}", ("gloo", "allreduce", size, 2), ("torch nocheck", "allreduce", size, 2)
        )
        put(f"torch_backend_checked_vs_gloo_{label}", ("gloo", "allreduce", size, 2), ("torch", "allreduce", size, 2))
    # small non-allreduce ops (the small job): what the check costs (checked/unchecked time, turn median) and
    # how close each is to the library it wraps (raw time / ours)
    for op in SMALL_OPS:
        for size in SMALL_SIZES:
            label = human_bytes(size).replace(" ", "")
            for ours, raw in (("mpi", "mpi4py same job"), ("torch", "gloo")):
                mine, bare = (ours, op, size, 2), (f"{ours} nocheck", op, size, 2)
                if mine in t and bare in t:
                    in_turns(f"{ours}_{op}_{label}_check_cost", mine, bare)
                put(f"{ours}_{op}_{label}_vs_{raw.split()[0]}", (raw, op, size, 2), mine)
    if ("shm", "allreduce", k64, 2) in t and ("shm nocheck", "allreduce", k64, 2) in t:
        on, off = t[("shm", "allreduce", k64, 2)], t[("shm nocheck", "allreduce", k64, 2)]
        out["check_overhead_shm_64KiB_best"] = round(on / off - 1, 4)
        # The goal's figure: from check_pairs, the turn median of checked/unchecked, minus 1. Bests of separate
        # rows differ by the machine's drift, often by more than the check's cost (0.2-0.4 us on a 12 us op).
        med = turn_median(("shm", "check_pairs", k64, 2), ("shm nocheck", "check_pairs", k64, 2))
        if med is not None:
            out["check_overhead_shm_64KiB"] = round(med - 1, 4)
    return out


def verdicts(rat: dict) -> dict:
    """Each targeted ratio: its goal and whether this run met it (None when the row is missing)."""
    out = {}
    for name, (cmp, goal) in TARGETS.items():
        v = rat.get(name)
        met = None if v is None else (v >= goal if cmp == ">=" else v <= goal)
        out[name] = {"value": v, "goal": f"{cmp} {goal}", "met": met}
    return out
