"""What waiting abortably costs (``fault_tolerance.recover: in_place``): torch (gloo) allreduce with the
abort watch off (gloo's own wait) and on (an event set by the op's future or by an abort), in turns.

    python benchmarks/abort_wait.py [--world 2] [--sizes 4096,4194304] [--json results/abort_wait.json]

One job of ``--world`` processes; both modes on the same communicator and buffers, repetitions in
turns (the order rotating), best and mean of the slowest rank. shm pays nothing (its waits check
the poison at their liveness checks), so it has no row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# benchmarks/collectives.py would shadow the collectives package: put the repo root first.
sys.path[:] = [ROOT] + [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

from benchmarks._common import human_bytes, measure_in_turns, print_table, spawn_job, write_json  # noqa: E402


def worker(sizes: list[int], reps: int, iters: int) -> None:
    import torch

    import collectives
    from collectives import ReduceOp
    from collectives.backends import torchdist

    comm = collectives.init("torch", timeout=120)
    flag = torch.zeros(1)

    def slowest(dt: float) -> float:
        flag[0] = dt
        comm.allreduce(flag, ReduceOp.MAX)
        return float(flag[0])

    def mode(watched: bool, t: torch.Tensor):
        def run() -> None:
            torchdist._SIGNAL.watched = watched  # the benchmark flips the switch watch_aborts() sets
            comm.allreduce(t)

        return run

    rows = []
    for n in sizes:
        t = torch.ones(n // 4)
        runs = {"gloo wait": mode(False, t), "abortable wait": mode(True, t)}
        stats = measure_in_turns(runs, comm.barrier, iters=iters, reps=reps, warmup_s=0.5, slowest=slowest)
        for name, s in stats.items():
            rows.append({"bytes": n, "mode": name, "best_us": s["best"] * 1e6, "mean_us": s["mean"] * 1e6})
    torchdist._SIGNAL.watched = False
    if comm.rank == 0:
        with open(os.environ["BENCH_OUT"], "w") as f:
            json.dump(rows, f)
    comm.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--sizes", default="4096,4194304")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--json", default="results/abort_wait.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ns = p.parse_args()
    sizes = [int(x) for x in ns.sizes.split(",")]
    if ns.worker:
        return worker(sizes, ns.reps, ns.iters)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--sizes", ns.sizes]
    rows = spawn_job(cmd + ["--reps", str(ns.reps), "--iters", str(ns.iters)], ns.world)
    base = {r["bytes"]: r["best_us"] for r in rows if r["mode"] == "gloo wait"}
    for r in rows:
        r["ratio_best"] = round(r["best_us"] / base[r["bytes"]], 3)
    print_table(
        f"torch (gloo) allreduce, {ns.world} ranks: gloo's wait vs the abortable wait (best / mean of {ns.reps})",
        ["bytes", "mode", "best us", "mean us", "best / gloo wait"],
        [
            [human_bytes(r["bytes"]), r["mode"], f"{r['best_us']:.0f}", f"{r['mean_us']:.0f}", f"{r['ratio_best']:.2f}"]
            for r in rows
        ],
    )
    write_json(ns.json, {"config": vars(ns), "rows": rows})
    print(f"wrote {ns.json}")


if __name__ == "__main__":
    main()
