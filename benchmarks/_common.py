"""Shared benchmark helpers: timing (warm-up, barrier, best-of/mean/stdev), rank spawning,
a rich table, and JSON results named by hardware and date.

    stats = measure(run_once, barrier, iters=20, reps=5)   # every rank, same arguments
    rows = spawn_job([sys.executable, __file__, "--worker", ...], world=2)  # rank 0's JSON
    write_json(path, {"rows": rows, "ratios": ...})        # adds "hardware" and "date"

Timing rule (STYLE.md 14): warm up, hit a barrier before every repetition, time ``iters``
calls on each rank, and keep the slowest rank's time per repetition (the collective is done
when the last rank is). Report best (min over repetitions), mean and stdev.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(
    run: Callable[[], None],
    barrier: Callable[[], None],
    *,
    iters: int,
    reps: int,
    warmup: int = 2,
    warmup_s: float = 0.0,
    slowest: Callable[[float], float] | None = None,
    rep_s: float | None = None,
) -> dict:
    """Seconds per call: ``{"best", "mean", "stdev", "reps"}``. ``slowest`` maps this rank's
    time to the max over ranks (e.g. an allreduce-max); without it, this rank's own time.

    Warm-up: ``warmup`` calls, then batches doubling in size until ``warmup_s`` seconds have passed
    on the slowest rank (``slowest``, which a multi-rank caller passing ``warmup_s`` must give, makes
    every rank take the same decision), at most about ``10 * iters`` calls more. A count fixed from the
    first calls' time fell short whenever those were slow: with more ranks than cores, the first row
    after a pause pays for waking every rank (measured: the same row at 4 ranks on 2 cores, 4 KiB
    allreduce, 92 us first vs 55 us second). ``rep_s``: cap ``iters`` so that one repetition takes about
    that long at the warm-up's pace (the slowest rank's), so slow rows can take many short repetitions."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        run()
    k, calls = max(warmup, 1), warmup
    while warmup_s > 0 or rep_s is not None:  # batches doubling in size until warmup_s has passed
        elapsed = time.perf_counter() - t0
        elapsed = slowest(elapsed) if slowest else elapsed  # the slowest rank's: every rank decides alike
        if elapsed >= warmup_s or k >= 10 * iters:
            break
        for _ in range(k):
            run()
        calls += k
        k *= 2
    if rep_s is not None and calls:  # fewer calls per repetition for slow rows: about rep_s each
        iters = max(1, min(iters, int(rep_s * calls / max(elapsed, 1e-9))))
    times = []
    for _ in range(reps):
        barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            run()
        dt = (time.perf_counter() - t0) / iters
        times.append(slowest(dt) if slowest else dt)
    return {
        "best": min(times),
        "mean": statistics.fmean(times),
        "stdev": statistics.stdev(times) if len(times) > 1 else 0.0,
        "reps": reps,
        "iters": iters,
    }


def measure_in_turns(
    runs: dict[str, Callable[[], None]],
    barrier: Callable[[], None],
    *,
    iters: int,
    reps: int,
    warmup_s: float = 0.0,
    slowest: Callable[[float], float] | None = None,
    rep_s: float | None = None,
) -> dict[str, dict]:
    """:func:`measure` for rows of one library (say gloo, and our backend over gloo) whose latency jumps
    between modes for long stretches: their repetitions are taken in turns, the order rotating, so every
    row sees the same modes. Warm-up and ``rep_s`` as in :func:`measure`, per row (the fewest calls wins).
    Each row's stats keep its repetitions' ``times`` in turn order, so rows can be compared turn by turn."""
    names = list(runs)
    first = {
        n: measure(runs[n], barrier, iters=iters, reps=1, warmup_s=warmup_s, slowest=slowest, rep_s=rep_s)
        for n in names
    }
    iters = min(f["iters"] for f in first.values())
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(reps):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            run = runs[name]
            barrier()
            t0 = time.perf_counter()
            for _ in range(iters):
                run()
            dt = (time.perf_counter() - t0) / iters
            times[name].append(slowest(dt) if slowest else dt)
    return {
        n: {
            "best": min(ts),
            "mean": statistics.fmean(ts),
            "stdev": statistics.stdev(ts) if len(ts) > 1 else 0.0,
            "reps": reps,
            "iters": iters,
            "times": ts,
        }
        for n, ts in times.items()
    }


def iters_for(nbytes: int, budget_bytes: int = 64 << 20, lo: int = 1, hi: int = 500) -> int:
    """Calls per repetition so that one repetition moves about ``budget_bytes``."""
    return max(lo, min(hi, budget_bytes // max(nbytes, 1)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_job(
    cmd: Sequence[str], world: int, *, timeout: float = 600, env: dict | None = None, mpiexec: bool = False
) -> object:
    """Run ``cmd`` on ``world`` local ranks (torchrun-style env, or under ``mpiexec -n``); the command
    writes its result as JSON to the path in $BENCH_OUT on rank 0; return it. Raises on any failure."""
    out = tempfile.mktemp(prefix="bench-", suffix=".json")
    base = dict(
        os.environ,
        BENCH_OUT=out,
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        DISTTRAIN_UNAUTHENTICATED_STORE="1",  # loopback benchmark jobs may open a plain TCPStore
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
        **(env or {}),
    )
    if mpiexec:
        exe = os.path.join(os.path.dirname(sys.executable), "mpiexec")
        procs = [subprocess.Popen([exe, "-n", str(world), *cmd], env=base, cwd=ROOT, start_new_session=True)]
    else:
        port, job = free_port(), "bench" + secrets.token_hex(4)
        procs = [
            subprocess.Popen(
                cmd,
                cwd=ROOT,
                start_new_session=True,
                env=dict(
                    base,
                    RANK=str(r),
                    WORLD_SIZE=str(world),
                    LOCAL_RANK=str(r),
                    LOCAL_WORLD_SIZE=str(world),
                    MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(port),
                    DISTTRAIN_JOB_ID=job,
                ),
            )
            for r in range(world)
        ]
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    codes = [p.returncode for p in procs]
    if any(codes) or not os.path.exists(out):
        raise RuntimeError(f"{' '.join(cmd[:4])}... on {world} ranks failed (exit codes {codes})")
    with open(out) as f:
        result = json.load(f)
    os.unlink(out)
    return result


def write_result(obj: object) -> None:
    """Rank 0 of a spawned job: hand ``obj`` back to :func:`spawn_job`."""
    with open(os.environ["BENCH_OUT"], "w") as f:
        json.dump(obj, f)


def hardware() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem / 2**30, 1),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "load_avg_1m": os.getloadavg()[0],
    }


def result_name(prefix: str) -> str:
    """``<prefix>-<cores>core-<YYYYmmdd>``: results named by hardware and date."""
    return f"{prefix}-{os.cpu_count()}core-{datetime.date.today():%Y%m%d}"


def write_json(path: str, payload: dict) -> None:
    payload = {
        "name": result_name(os.path.splitext(os.path.basename(path))[0]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hardware": hardware(),
        **payload,
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:g}{unit}" if unit == "B" else f"{n:g}{unit}"
        n //= 1024
    return str(n)


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain text fallback
        print(title)
        print(" | ".join(columns))
        for r in rows:
            print(" | ".join(map(str, r)))
        return
    table = Table(title=title)
    for i, c in enumerate(columns):
        table.add_column(c, justify="left" if i < 3 else "right")
    for r in rows:
        table.add_row(*map(str, r))
    Console(width=160).print(table)
