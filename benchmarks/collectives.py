"""Collectives: our backends against the peers used directly, in the same run.

    python benchmarks/collectives.py --quick --json results/collectives.json   # about a minute
    python benchmarks/collectives.py --json results/collectives.json           # 4 KiB .. 256 MiB

Rows (2 and 4 ranks; allreduce, allgather, reduce_scatter, broadcast; float32):

* ``shm zero-copy``: our shm backend through the communicator on ``comm.alloc`` buffers
  (the path data parallel's gradient buckets take); ``shm``: the same on plain tensors
  (staged through shared memory); ``shm nocheck``: plain, fingerprint checks off (allreduce
  only; gives the check's cost); ``shm direct``: the backend without the communicator
  (allreduce only; shows what the communicator's per-call Python costs at small sizes);
* ``torch``/``mpi``: our other backends through the communicator, when available;
  ``torch nocheck``/``mpi nocheck``: the same with fingerprint checks off (allreduce,
  allgather), i.e. what the backend and the communicator's call path cost over the raw
  library (the raw library checks nothing);
* peers used directly: ``gloo`` (torch.distributed), ``mpi4py+MPICH`` (under ``mpiexec``),
  ``mpi4py same job`` (allreduce, allgather: mpi4py on MPI_COMM_WORLD in the processes that run our
  ``mpi`` backend, in turns with its rows: what that backend adds over the library it wraps, the
  processes and the moment being the same),
  ``horovod`` (when importable); ``memcpy``: one core copying the same bytes (the bound).

Sizes follow nccl-tests: for allgather and reduce_scatter, ``size`` is the whole gathered
(or scattered) buffer, each rank contributes size/ranks. algbw = size / time; busbw =
algbw * 2(n-1)/n (allreduce), * (n-1)/n (allgather, reduce_scatter), * 1 (broadcast).
Each job interleaves its rows per (op, size); with ``--rounds`` > 1 every job runs again
and the best of all rounds is kept, so slow phases of a loaded machine hit every row. A row's
time is its best repetition; below 1 MiB a row takes three times the repetitions, each of at most
about 20 ms (fewer calls for slow rows), so a short disturbance of the machine spoils few of them.
``check_overhead_shm_64KiB`` comes from its own measurement at the end of the 2-rank job
(``check_pairs``): 64 KiB allreduces with and without the check in 40 turns, the median over
turns of checked/unchecked - 1. The check costs a few tenths of a microsecond on
a 12 us op, less than the bests of two rows measured one after the other drift apart
(``check_overhead_shm_64KiB_best`` still gives that ratio of bests). Likewise gloo and our torch
backend over it, and MPICH and our mpi backend in the same processes, take their repetitions in
turns, and their goal ratios are the median over turns of raw/ours (``..._best``: the ratio of bests);
below 1 MiB they take three times as many turns, each a third as long (about 7 ms).

World sizes: 2 and 4 (all rows), and 8 (4 KiB allreduce and allgather of shm, gloo and
MPICH only): 4 and 8 ranks oversubscribe a 2-core machine, which is what shm's waiting
(spin, yield, futex) is for. The load average is printed with the table (and in the JSON):
compare ratios from one run, never absolute times across runs.

JSON (``--json``): ``rows``, ``ratios`` (peer_time / our_time, or our_time / memcpy) and
``targets`` (each ratio's goal from issue 17, and whether this run met it).
To add rows (e.g. ``disttrain.horovod``), append a :class:`Producer` to ``PRODUCERS`` whose
``kind`` names a function in ``WORKERS``; it gets the spec and returns rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._common import (
    human_bytes,
    iters_for,
    measure,
    measure_in_turns,
    print_table,
    spawn_job,  # noqa: E402
    write_json,
    write_result,
)

OPS = ("allreduce", "allgather", "reduce_scatter", "broadcast")
FULL_SIZES = [4 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20, 256 << 20]
QUICK_SIZES = [4 << 10, 64 << 10, 1 << 20, 64 << 20]
BUS = {
    "allreduce": lambda n: 2 * (n - 1) / n,
    "allgather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "broadcast": lambda n: 1.0,
}


@dataclasses.dataclass
class Producer:
    """One job producing rows: ``kind`` picks the worker, ``mpiexec`` starts it under MPI's launcher."""

    kind: str
    mpiexec: bool = False
    optional: bool = True  # skip (with a note) when the job cannot run here


PRODUCERS: list[Producer] = [Producer("comm", optional=False), Producer("mpi4py", mpiexec=True)]


# -- workers (run on every rank of a spawned job) -------------------------------------------
SMALL_ROW = 1 << 20  # below: latency rows, three times the repetitions, each about REP_S long at most
REP_S = 0.02
# Rows of one library taking their repetitions in turns: gloo's latency on loopback jumps between modes (about
# 0.45 and 1.5 ms at 4 KiB) for long stretches, so gloo used directly and our torch backend over it are measured
# together, or their ratio would be the modes' draw; likewise MPICH called directly and our mpi backend over it
# (in the same processes: a ratio of a few microseconds must not be a drift of the machine between two rows).
IN_TURNS = (("gloo", "torch", "torch nocheck"), ("mpi", "mpi nocheck", "mpi4py same job"))


def _row_table(spec: dict, variants: dict, barrier, slowest, rank: int = 0) -> list[dict]:
    """Interleave every variant per (op, size); ``variants[name][op](nbytes)`` returns a run() or None.
    With ``spec["memcpy"]``, rank 0 also times one core's memcpy of each size in between (the others wait
    in the barrier), so the bound sees the same machine load as the rows it bounds."""
    rows = []
    for op in spec["ops"]:
        for size in spec["sizes"]:
            if spec.get("memcpy") and op == spec["ops"][0]:
                if rank == 0:
                    src, dst = np.ones(size, np.uint8), np.zeros(size, np.uint8)
                    stats = measure(
                        lambda dst=dst, src=src: np.copyto(dst, src),
                        lambda: None,
                        iters=iters_for(size),
                        reps=spec["reps"],
                    )
                    rows.append({"row": "memcpy", "op": "memcpy", "bytes": size, "ranks": 1, **stats})
                    del src, dst
                barrier()
            small = size < SMALL_ROW
            reps = spec["reps"] * 3 if small else spec["reps"] if size < (64 << 20) else max(2, spec["reps"] // 2)
            how = dict(
                iters=iters_for(size, hi=spec.get("max_iters", 500)),
                reps=reps,
                warmup_s=0.05,
                slowest=slowest,
                rep_s=REP_S if small else None,
            )
            together: list[dict] = [{} for _ in IN_TURNS]  # each group's rows, measured in turns once all are made
            for name, ops in variants.items():
                make = ops.get(op)
                run = make(size) if make else None
                if run is None:
                    continue
                group = next((g for g, names in enumerate(IN_TURNS) if name in names), None)
                if group is not None:
                    together[group][name] = run
                    continue
                stats = measure(run, barrier, **how)
                rows.append({"row": name, "op": op, "bytes": size, "ranks": spec["world"], **stats})
                del run
            while together:  # a group's buffers go before the next group's are measured
                runs = together.pop(0)
                if runs:  # small rows: three times the turns, a third as long (same time; a steadier median)
                    turns = dict(how, reps=reps * 3, rep_s=REP_S / 3) if small else how
                    got = measure_in_turns(runs, barrier, **turns)
                    rows += [{"row": k, "op": op, "bytes": size, "ranks": spec["world"], **v} for k, v in got.items()]
                del runs
    return rows


def worker_comm(spec: dict) -> list[dict]:
    """Our communicators (shm, torch, mpi) and torch.distributed gloo used directly."""
    import datetime

    import torch
    import torch.distributed as dist

    import collectives
    from collectives import registry

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        rank == 0,
        timeout=datetime.timedelta(seconds=120),
    )
    comms = {}
    only = set(spec.get("only") or ())
    avail = [b for b in registry.available() if not only or b in only]
    if "mpi" in avail:  # first: MPI must not be initialised by anything else before it
        try:
            comms["mpi"] = collectives.init("mpi", store=dist.PrefixStore("mpi", store), timeout=120)
        except Exception as exc:  # noqa: BLE001 - optional row
            print(f"rank {rank}: mpi backend skipped: {exc}", file=sys.stderr)
    shm = collectives.init("shm", timeout=120)
    shm_nocheck = collectives.Communicator(shm.backend, shm.env, check=False, timeout=120)
    if "torch" in avail:
        comms["torch"] = collectives.init("torch", store=dist.PrefixStore("torch", store), timeout=120)
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.PrefixStore("gloo", store), rank=rank, world_size=world)
    gloo = dist.new_group(backend="gloo")  # its own group, apart from the torch backend's
    top = max(spec["sizes"])
    pool = shm.alloc(top // 4)  # the zero-copy buffer every shm zero-copy row uses a prefix of

    def comm_ops(comm, zero_copy: bool = False) -> dict:
        def buf(nbytes):
            return pool[: nbytes // 4].zero_() if zero_copy else torch.zeros(nbytes // 4)

        def allreduce(nb):
            t = buf(nb)
            return lambda: comm.allreduce(t)

        def allgather(nb):
            t = buf(nb // world)
            outs = [torch.empty(nb // world // 4) for _ in range(world)]
            return lambda: comm.allgather(outs, t)

        def reduce_scatter(nb):
            ins = list(buf(nb).split(nb // world // 4))
            out = torch.empty(nb // world // 4)
            return lambda: comm.reduce_scatter(out, ins)

        def broadcast(nb):
            t = buf(nb)
            return lambda: comm.broadcast(t, 0)

        return {
            "allreduce": allreduce,
            "allgather": allgather,
            "reduce_scatter": reduce_scatter,
            "broadcast": broadcast,
        }

    def direct_allreduce(nb):
        t, be = torch.zeros(nb // 4), shm.backend
        return lambda: be.allreduce(t, collectives.ReduceOp.SUM)

    def gloo_ops() -> dict:
        def allreduce(nb):
            t = torch.zeros(nb // 4)
            return lambda: dist.all_reduce(t, group=gloo)

        def allgather(nb):
            t, outs = torch.zeros(nb // world // 4), [torch.empty(nb // world // 4) for _ in range(world)]
            return lambda: dist.all_gather(outs, t, group=gloo)

        def broadcast(nb):
            t = torch.zeros(nb // 4)
            return lambda: dist.broadcast(t, 0, group=gloo)

        return {"allreduce": allreduce, "allgather": allgather, "broadcast": broadcast}  # gloo: no reduce_scatter

    variants = {
        "shm zero-copy": comm_ops(shm, zero_copy=True),
        "shm": comm_ops(shm),
        "shm nocheck": {"allreduce": comm_ops(shm_nocheck)["allreduce"]},
        "shm direct": {"allreduce": direct_allreduce},
        "gloo": gloo_ops(),
    }
    if only:
        variants = {k: v for k, v in variants.items() if k in only}
    for name, c in comms.items():
        variants[name] = comm_ops(c)
        unchecked = comm_ops(collectives.Communicator(c.backend, c.env, check=False, timeout=120))
        variants[f"{name} nocheck"] = {"allreduce": unchecked["allreduce"], "allgather": unchecked["allgather"]}
        if name == "mpi":  # the library it wraps, called directly in the same processes (measured in turns with it)
            from mpi4py import MPI

            raw = mpi4py_ops(MPI.COMM_WORLD, world)
            variants["mpi4py same job"] = {"allreduce": raw["allreduce"], "allgather": raw["allgather"]}
    mx = torch.zeros(1)

    def slowest(dt: float) -> float:
        mx[0] = dt
        shm.allreduce(mx, collectives.ReduceOp.MAX)
        return float(mx[0])

    rows = _row_table({**spec, "memcpy": True}, variants, shm.barrier, slowest, rank)
    if world == 2 and (64 << 10) in spec["sizes"] and "allreduce" in spec["ops"]:
        rows += check_pairs(shm, shm_nocheck, slowest)
    return _hand_back(rows, rank, shm.barrier)


def check_pairs(checked, unchecked, slowest, nbytes: int = 64 << 10, blocks: int = 160, iters: int = 50) -> list[dict]:
    """The check's cost on ``nbytes`` allreduces: ``blocks`` turns of ``iters`` calls with and without it
    (:func:`measure_in_turns`), as rows ``shm`` and ``shm nocheck`` of op ``check_pairs`` (kept out of the
    table; their turn times give the median of checked/unchecked - 1)."""
    import torch

    t = torch.zeros(nbytes // 4)
    runs = {"shm": lambda: checked.allreduce(t), "shm nocheck": lambda: unchecked.allreduce(t)}
    got = measure_in_turns(runs, checked.barrier, iters=iters, reps=blocks, warmup_s=0.05, slowest=slowest)
    return [{"row": k, "op": "check_pairs", "bytes": nbytes, "ranks": checked.world_size, **v} for k, v in got.items()]


def mpi4py_ops(comm, world: int) -> dict:
    """mpi4py's buffer methods on numpy arrays: the raw library, as a user calls it."""
    from mpi4py import MPI

    def allreduce(nb):
        a = np.zeros(nb // 4, np.float32)
        return lambda: comm.Allreduce(MPI.IN_PLACE, a)

    def allgather(nb):
        a, out = np.zeros(nb // world // 4, np.float32), np.empty(nb // 4, np.float32)
        return lambda: comm.Allgather(a, out)

    def reduce_scatter(nb):
        a, out = np.zeros(nb // 4, np.float32), np.empty(nb // world // 4, np.float32)
        return lambda: comm.Reduce_scatter_block(a, out)

    def broadcast(nb):
        a = np.zeros(nb // 4, np.float32)
        return lambda: comm.Bcast(a, 0)

    return {"allreduce": allreduce, "allgather": allgather, "reduce_scatter": reduce_scatter, "broadcast": broadcast}


def worker_mpi4py(spec: dict) -> list[dict]:
    """mpi4py's buffer methods over MPICH, started by mpiexec."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    world = comm.size
    mx = np.zeros(1)

    def slowest(dt):
        mx[0] = dt
        comm.Allreduce(MPI.IN_PLACE, mx, op=MPI.MAX)
        return float(mx[0])

    rows = _row_table({**spec, "world": world}, {"mpi4py+MPICH": mpi4py_ops(comm, world)}, comm.Barrier, slowest)
    return _hand_back(rows, comm.rank, comm.Barrier)


WORKERS = {"comm": worker_comm, "mpi4py": worker_mpi4py}


def _hand_back(rows: list[dict], rank: int, barrier) -> list[dict]:
    """Rank 0 writes the rows for the coordinator; then every rank passes a barrier, so none exits before
    they are on disk (under mpiexec, a rank that leaves first may get the others killed: once, rank 0
    was stopped mid-write and the coordinator read an empty file from a job that exited 0)."""
    if rank == 0:
        write_result(rows)
    barrier()
    return rows


def worker_main(kind: str, spec: dict) -> None:
    WORKERS[kind](spec)
    sys.stdout.flush()
    if kind == "mpi4py":
        # A normal exit (mpi4py finalizes MPI on the way out). With os._exit, with or without MPI.Finalize
        # first, hydra SIGKILLed the ranks still running in 1 to 3 of 8 jobs ("exit codes [9]": rows lost);
        # with a normal exit, in none of 6
        return
    os._exit(0)  # skip interpreter teardown (gloo threads): the rows are written


# -- coordinator -------------------------------------------------------------------------------
def memcpy_rows(sizes: list[int], reps: int) -> list[dict]:
    rows = []
    for size in sizes:
        src, dst = np.ones(size, np.uint8), np.zeros(size, np.uint8)
        stats = measure(lambda dst=dst, src=src: np.copyto(dst, src), lambda: None, iters=iters_for(size), reps=reps)
        rows.append({"row": "memcpy", "op": "memcpy", "bytes": size, "ranks": 1, **stats})
    return rows


def best_of(rows: list[dict]) -> list[dict]:
    best: dict = {}
    for r in rows:
        key = (r["row"], r["op"], r["bytes"], r["ranks"])
        if key not in best or r["best"] < best[key]["best"]:
            best[key] = r
    return list(best.values())


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repetitions (about a minute)")
    ap.add_argument("--json", help="write rows and ratios here")
    ap.add_argument("--ranks", default=None, help="comma-separated world sizes (default 2,4)")
    ap.add_argument("--rounds", type=int, default=None, help="run every job this many times, keep the best")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker_main(args.worker, json.loads(args.spec))
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    reps = 3 if args.quick else 5
    rounds = args.rounds or (1 if args.quick else 2)
    worlds = [int(w) for w in (args.ranks or "2,4,8").split(",")]
    load_before = os.getloadavg()
    rows, notes, by_round = memcpy_rows(sizes, reps), [], []
    for _ in range(rounds):
        by_round.append({})
        for world in worlds:
            job_sizes = sizes if world == 2 or not args.quick else [s for s in sizes if s in (4 << 10, 64 << 20)]
            spec = {"sizes": job_sizes, "ops": list(OPS), "reps": reps, "world": world}
            if args.quick:
                spec["max_iters"] = 200  # a 4 KiB gloo call takes about 1 ms: bound each repetition
            if world >= 8:  # the crowded case: small messages only, the rows the waiting strategy is about
                spec.update(sizes=[4 << 10], ops=["allreduce", "allgather"], only=["shm", "shm direct", "gloo"])
            for p in PRODUCERS:
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", p.kind, "--spec", json.dumps(spec)]
                t0 = time.monotonic()
                try:
                    got = spawn_job(cmd, world, mpiexec=p.mpiexec, timeout=900)
                    rows += got
                    by_round[-1].update({(r["row"], r["op"], r["bytes"], r["ranks"]): r for r in got})
                except (RuntimeError, OSError) as exc:
                    if not p.optional:
                        raise
                    notes.append(f"{p.kind} on {world} ranks skipped: {exc}")
                print(f"  {p.kind} x{world}: {time.monotonic() - t0:.1f}s", file=sys.stderr)
    try:
        import horovod.torch  # noqa: F401
    except ImportError:
        notes.append("horovod not importable here: no Horovod rows (scripts/build_horovod.sh builds it)")
    rows = best_of([r for r in rows if r["op"] != "check_pairs"])
    table = []
    for r in sorted(rows, key=lambda r: (r["ranks"], r["op"], r["bytes"], r["best"])):
        algbw = r["bytes"] / r["best"] / 1e9
        bus = algbw * BUS[r["op"]](r["ranks"]) if r["op"] in BUS else algbw
        r.update(algbw_GBps=round(algbw, 3), busbw_GBps=round(bus, 3))
        table.append(
            [
                r["ranks"],
                r["op"],
                r["row"],
                human_bytes(r["bytes"]),
                f"{r['best'] * 1e6:,.1f}",
                f"{r['mean'] * 1e6:,.1f} ± {r['stdev'] * 1e6:,.1f}",
                f"{algbw:.2f}",
                f"{bus:.2f}",
            ]
        )
    print_table(
        "collectives (float32; time = best of reps, us)",
        ["ranks", "op", "row", "size", "time us", "mean ± stdev", "algbw GB/s", "busbw GB/s"],
        table,
    )
    load = {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()]}
    print(f"load average (1, 5, 15 min): before {load['before']}, after {load['after']} on {os.cpu_count()} cores")
    rat = ratios(rows, by_round)
    goals = verdicts(rat)
    for k, v in rat.items():
        g = goals.get(k)
        mark = "" if g is None else f"  target {g['goal']}: {'met' if g['met'] else 'MISSED'}"
        print(f"{k:44s} {v}{mark}")
    for k, g in goals.items():
        if g["value"] is None:
            print(f"{k:44s} (row missing)  target {g['goal']}")
    for n in notes:
        print("note:", n)
    if args.json:
        payload = {"rows": rows, "ratios": rat, "targets": goals, "load": load, "notes": notes, "quick": args.quick}
        write_json(args.json, payload)


if __name__ == "__main__":
    main()
