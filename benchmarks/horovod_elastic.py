"""Horovod elastic (``hvd.elastic.run``): what a commit costs, and a lost and a new worker.

    .venv/bin/python benchmarks/horovod_elastic.py --json results/horovod_elastic.json [--reps 5] [--rounds 2]

One Horovod-style script (below, ``--worker``: an MLP, SGD with momentum, DistributedOptimizer,
``TorchState``) runs twice, on this machine, 2 workers:

* ``elastic``: ``disttrain launch --min-np 1 --max-np 2 --host-discovery-script`` (hosts 127.0.0.1
  and 127.0.0.2, one slot each). Steady state first: blocks of ``--steps`` steps alternating
  with and without ``state.commit()`` (a barrier before each block), so ``commit_overhead`` is
  the step with a commit over the step without, on the same world. Then one step after another,
  with a commit each; the worker on 127.0.0.2 is SIGKILLed: ``recovery_s`` is SIGKILL -> the
  survivor's first completed step (in the new world of 1), ``steps_lost`` the committed steps
  done again (0: only the step in flight is redone). Then 127.0.0.3 is added to the script's
  answer: ``grow_s`` is that write -> the first step of the world of 2 (includes starting the
  new worker's Python and torch, and the sync of the state from rank 0).
* the peer, ``restart``: the same script under ``disttrain launch --nproc-per-node 2 --max-restarts 1``
  (no driver: the default, non-elastic path, shm backend, gradient buckets). The same kill:
  the agent restarts both workers, which start from step 0 (``steps_lost`` = every step).

``--rounds`` alternates the two (ours, the peer, ours, ...); ``step_vs_peer`` is the elastic step
over the peer's step of the same round. Prints a table and writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [ROOT] + [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
WIDTH, LAYERS, BATCH = 256, 4, 32


def worker(args) -> None:
    import torch

    import disttrain.horovod as hvd

    hvd.init()
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)])
    opt = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9), named_parameters=model.named_parameters()
    )
    x = torch.randn(BATCH, WIDTH)
    host = os.environ.get("HOROVOD_HOSTNAME", "")

    def log(row: dict) -> None:
        with open(args.steps_log, "a") as f:
            f.write(json.dumps(row) + "\n")

    def step() -> None:
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()

    log({"kind": "pid", "pid": os.getpid(), "host": host, "restart": os.environ.get("DISTTRAIN_RESTART_COUNT")})
    state = hvd.elastic.TorchState(model, opt, batch=0)
    first = os.environ.get("DISTTRAIN_RESTART_COUNT", "0") == "0"
    if first and os.environ.get("DISTTRAIN_ELASTIC_ID", "0") in ("0", "1"):  # the first world only
        for _ in range(3):
            step()
        for block in range(2 * args.reps):
            commit = block % 2 == 0
            hvd.barrier()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
                if commit:
                    state.commit()
            seconds = (time.perf_counter() - t0) / args.steps
            if hvd.rank() == 0:
                log({"kind": "steady", "commit": commit, "s": seconds, "size": hvd.size()})
        state.commit()

    @hvd.elastic.run
    def train(state):
        while True:
            step()
            state.batch += 1
            if hvd.rank() == 0:
                log({"kind": "step", "t": time.time(), "batch": state.batch, "size": hvd.size()})
            state.commit()
            if hvd.broadcast_object(os.path.exists(args.stop_file), 0, name="bench.stop"):
                return

    train(state)


# -- the controller --------------------------------------------------------------------------------
def _rows(path: str) -> list[dict]:
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def _wait(path: str, proc, test, timeout: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hit = next((r for r in _rows(path) if test(r)), None)
        if hit is not None:
            return hit
        if proc.poll() is not None:
            raise SystemExit(f"the job ended early (exit {proc.returncode})")
        time.sleep(0.02)
    proc.kill()
    raise SystemExit(f"timed out waiting in {path}")


def run_mode(mode: str, args, tmp: str) -> dict:
    log, stop, hosts = (os.path.join(tmp, f"{mode}.{n}") for n in ("jsonl", "stop", "hosts"))
    with open(hosts, "w") as f:
        f.write("127.0.0.1:1\n127.0.0.2:1\n")
    script = os.path.join(tmp, "hosts.sh")
    with open(script, "w") as f:
        f.write(f"#!/bin/sh\ncat {hosts}\n")
    os.chmod(script, 0o700)
    launch = [sys.executable, "-m", "launcher.cli"]
    if mode == "elastic":
        launch += ["--min-np", "1", "--max-np", "2", "--host-discovery-script", script, "--discovery-interval", "0.5"]
    else:
        launch += ["--nproc-per-node", "2", "--max-restarts", "1"]
    launch += [os.path.abspath(__file__), "--worker", "--steps-log", log, "--stop-file", stop]
    launch += ["--reps", str(args.reps), "--steps", str(args.steps)]
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen(launch, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(log, proc, lambda r: r["kind"] == "step" and r["batch"] >= 20)
        rows = _rows(log)
        steady = [r for r in rows if r["kind"] == "steady"]
        with_c = min(r["s"] for r in steady if r["commit"])
        without = min(r["s"] for r in steady if not r["commit"])
        pids = [r for r in rows if r["kind"] == "pid"]
        victim = next(r["pid"] for r in pids if r["host"] == "127.0.0.2") if mode == "elastic" else pids[-1]["pid"]
        os.kill(victim, signal.SIGKILL)
        t_kill = time.time()
        if mode == "elastic":  # the first step of the new world (of 1)
            after = _wait(log, proc, lambda r: r["kind"] == "step" and r["t"] > t_kill and r["size"] == 1)
        else:  # the first step of the restarted workers (they count from 1 again)
            first = max(r["batch"] for r in _rows(log) if r["kind"] == "step")
            after = _wait(log, proc, lambda r: r["kind"] == "step" and r["t"] > t_kill and r["batch"] < first)
        steps = [r for r in _rows(log) if r["kind"] == "step"]
        before = max(r["batch"] for r in steps[: steps.index(after)])  # the last step of the old world
        out = {
            "mode": mode,
            "step_ms": without * 1e3,
            "step_commit_ms": with_c * 1e3,
            "commit_overhead": with_c / without,
            "recovery_s": after["t"] - t_kill,
            "steps_lost": before - (after["batch"] - 1),
            "grow_s": None,
        }
        if mode == "elastic":
            with open(hosts + ".new", "w") as f:
                f.write("127.0.0.1:1\n127.0.0.3:1\n")
            os.replace(hosts + ".new", hosts)
            t_add = time.time()
            grown = _wait(log, proc, lambda r: r["kind"] == "step" and r["t"] > t_add and r["size"] == 2)
            out["grow_s"] = grown["t"] - t_add
        open(stop, "w").close()
        proc.wait(120)
        out["exit_code"] = proc.returncode
        return out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--steps-log")
    p.add_argument("--stop-file")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2, help="rounds of ours then the peer")
    p.add_argument("--json", default="results/horovod_elastic.json")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    from benchmarks._common import print_table, write_json

    results = []
    for n in range(args.rounds):  # ours and the peer alternate, so a busy machine weighs on both
        for mode in ("elastic", "restart"):
            with tempfile.TemporaryDirectory(prefix="hvd-elastic-bench-") as tmp:
                results.append({**run_mode(mode, args, tmp), "round": n})
    for r in results:  # the elastic step over the peer's (non-elastic) step of the same round
        peer = next(p for p in results if p["mode"] == "restart" and p["round"] == r["round"])
        r["step_vs_peer"] = r["step_ms"] / peer["step_ms"]
    cols = ["round", "mode", "step_ms", "step_vs_peer", "step_commit_ms", "commit_overhead", "recovery_s"]
    cols += ["steps_lost", "grow_s"]
    fmt = [[r[c] if not isinstance(r[c], float) else f"{r[c]:.3g}" for c in cols] for r in results]
    print_table(f"hvd.elastic, 2 workers, MLP {LAYERS}x{WIDTH} (best of {args.reps})", cols, fmt)
    write_json(args.json, {"rows": results, "reps": args.reps, "steps": args.steps, "rounds": args.rounds})


if __name__ == "__main__":
    main()
