"""What the cross-rank fingerprint check costs: allreduce with ``check`` on vs off, per backend.

    python benchmarks/check_overhead.py                      # torch, mpi (+ shm when registered)
    python benchmarks/check_overhead.py --size 65536 --world 2 --json /tmp/check.json

Each backend runs in its own job of ``--world`` processes. Checks on and off alternate on
the same communicator (same buffers, same warm caches), in rounds after a warm-up and a
barrier; the best round of each mode is kept, because this machine is shared and noisy.
Overhead = time_on / time_off - 1.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# benchmarks/collectives.py would shadow the collectives package: put the repo root first.
sys.path[:] = [ROOT] + [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]


def worker(backend: str, size: int, rounds: int, iters: int) -> None:
    import torch
    import torch.distributed as dist

    import collectives

    world = int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        int(os.environ["RANK"]) == 0,
        timeout=datetime.timedelta(seconds=120),
    )
    comm = collectives.init(backend, store=store, timeout=120)
    t = comm.alloc(size // 4, torch.float32)
    t.fill_(1.0)
    best = {True: float("inf"), False: float("inf")}
    for _ in range(max(iters // 4, 5)):  # warm-up, both modes
        for mode in (True, False):
            comm.check = mode
            comm.allreduce(t)
    for _ in range(rounds):
        for mode in (True, False):
            comm.check = mode
            comm.barrier()
            t0 = time.perf_counter()
            for _ in range(iters):
                comm.allreduce(t)
            best[mode] = min(best[mode], (time.perf_counter() - t0) / iters)
    comm.check = True
    comm.barrier()
    if comm.rank == 0:
        print(json.dumps({"backend": backend, "on_us": best[True] * 1e6, "off_us": best[False] * 1e6}), flush=True)
    comm.close()


def run(backend: str, world: int, size: int, rounds: int, iters: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            DISTTRAIN_JOB_ID=f"bench{os.getpid()}{backend}",
            OMP_NUM_THREADS="1",
            PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
        )
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--worker",
            backend,
            "--size",
            str(size),
            "--rounds",
            str(rounds),
            "--iters",
            str(iters),
        ]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise SystemExit(f"{backend}: timed out") from None
        if p.returncode != 0:
            for q in procs:
                q.kill()
            raise SystemExit(f"{backend}: a rank failed (exit {p.returncode}):\n{err[-3000:]}")
        outs.append(out)
    row = json.loads(outs[0].strip().splitlines()[-1])
    row["overhead"] = row["on_us"] / row["off_us"] - 1
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--backends", nargs="*", help="default: every available backend except nccl")
    ap.add_argument("--size", type=int, default=64 * 1024, help="message size in bytes (float32)")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.size, args.rounds, args.iters)
        return
    from collectives import registry

    backends = args.backends or [b for b in registry.available() if b != "nccl"]
    rows = [run(b, args.world, args.size, args.rounds, args.iters) for b in backends]
    print(
        f"allreduce {args.size // 1024} KiB float32, {args.world} ranks, best of {args.rounds} rounds "
        f"x {args.iters} ops ({platform.node()}, {datetime.date.today()})"
    )
    print(f"{'backend':8} {'check on (us)':>14} {'check off (us)':>15} {'overhead':>9}")
    for r in rows:
        print(f"{r['backend']:8} {r['on_us']:14.1f} {r['off_us']:15.1f} {r['overhead']:9.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "size": args.size,
                    "world": args.world,
                    "host": platform.node(),
                    "date": str(datetime.date.today()),
                    "rows": rows,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
