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

The small job (2 ranks; ``--no-small`` skips it): allgather, broadcast, reduce_scatter, all_to_all and
``sendrecv`` (ranks 0 and 1 there and back) at 64 B and 4 KiB, on ``mpi``/``torch`` checked and unchecked
with their libraries (``mpi4py same job``, ``gloo``) in turns: ``<backend>_<op>_<size>_check_cost`` is the
turn median of checked/unchecked time, ``<backend>_<op>_<size>_vs_<library>`` the library's time over ours.
Every checked op of those sends the carried check's fixed frame first (``collectives.carried``).

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
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._collective_peers import gloo_ops, mpi4py_ops  # noqa: E402
from benchmarks._collective_ratios import SMALL_OPS, SMALL_SIZES, ratios, verdicts  # noqa: E402
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
    "all_to_all": lambda n: (n - 1) / n,
    "sendrecv": lambda n: 1.0,
}
SMALL_ROWS = ["mpi", "mpi nocheck", "mpi4py same job", "torch", "torch nocheck", "gloo"]


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

        def all_to_all(nb):
            ins = [torch.zeros(nb // world // 4) for _ in range(world)]
            outs = [torch.empty(nb // world // 4) for _ in range(world)]
            return lambda: comm.all_to_all(outs, ins)

        def sendrecv(nb):  # ranks 0 and 1: there and back (others idle)
            t, peer = torch.zeros(nb // 4), 1 - rank

            def there_and_back():
                if rank == 0:
                    comm.send(t, peer)
                    comm.recv(t, peer)
                elif rank == 1:
                    comm.recv(t, peer)
                    comm.send(t, peer)

            return there_and_back

        return {
            "allreduce": allreduce,
            "allgather": allgather,
            "reduce_scatter": reduce_scatter,
            "broadcast": broadcast,
            "all_to_all": all_to_all,
            "sendrecv": sendrecv,
        }

    def direct_allreduce(nb):
        t, be = torch.zeros(nb // 4), shm.backend
        return lambda: be.allreduce(t, collectives.ReduceOp.SUM)

    variants = {
        "shm zero-copy": comm_ops(shm, zero_copy=True),
        "shm": comm_ops(shm),
        "shm nocheck": {"allreduce": comm_ops(shm_nocheck)["allreduce"]},
        "shm direct": {"allreduce": direct_allreduce},
        "gloo": gloo_ops(gloo, rank, world),
    }
    if only:
        variants = {k: v for k, v in variants.items() if k in only}
    for name, c in comms.items():
        variants[name] = comm_ops(c)
        unchecked = comm_ops(collectives.Communicator(c.backend, c.env, check=False, timeout=120))
        small = spec.get("small")  # the small-ops job: every op unchecked too, and every raw op
        keep = ("allreduce", "allgather")
        variants[f"{name} nocheck"] = unchecked if small else {k: unchecked[k] for k in keep}
        if name == "mpi":  # the library it wraps, called directly in the same processes (measured in turns with it)
            from mpi4py import MPI

            raw = mpi4py_ops(MPI.COMM_WORLD, world)
            variants["mpi4py same job"] = raw if small else {k: raw[k] for k in keep}
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repetitions (about a minute)")
    ap.add_argument("--json", help="write rows and ratios here")
    ap.add_argument("--ranks", default=None, help="comma-separated world sizes (default 2,4)")
    ap.add_argument("--rounds", type=int, default=None, help="run every job this many times, keep the best")
    ap.add_argument("--no-small", action="store_true", help="skip the small non-allreduce ops job (2 ranks)")
    ap.add_argument("--small-only", action="store_true", help="run only that job")
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
            jobs = [] if args.small_only else [(p, spec) for p in PRODUCERS]
            if world == 2 and not args.no_small:  # small non-allreduce ops on mpi/torch, each with its peer
                small = {"sizes": SMALL_SIZES, "ops": list(SMALL_OPS), "reps": reps, "world": world}
                jobs.append((Producer("comm"), {**small, "only": SMALL_ROWS, "small": True, "max_iters": 200}))
            for p, spec in jobs:
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
