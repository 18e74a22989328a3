"""Losing a host and getting it back: the GPT example on 2 hosts (network namespaces, as the
launcher's tests use; needs root and iproute2), each started torchrun-style with ``--nnodes 1:2``.

    python benchmarks/fault_tolerance.py --json results/fault_tolerance.json [--strategies ddp,zero3]

Per strategy, three times: peer replicas off (recovery from the disk checkpoint) and on
(``fault_tolerance.every``, recovery from the copies in the surviving agent's memory), the latter
with ``recover`` restart (new worker processes) and in_place (the survivors' processes kept:
``fault_tolerance.recover``), one after the other in the same run. Each run:
train, SIGKILL host 1 (its agent and workers) mid-run, let host 0 go on alone, then start host 1
again with the same command and let it rejoin. Columns:

* ``step_s``: seconds a step at world 2 before the loss (steps ``--warm`` to ``--kill-at``);
  ``replication_overhead``: the median step time with replicas on over off, from ``--rounds``
  short runs without a loss, alternated off/on (goal <= 1.03);
* ``recovery_s``: SIGKILL -> the survivors' first completed step (goal <= 10);
* ``steps_lost``: steps done before the loss and redone after it (goal <= 1);
* ``recovery_disk_bytes_read``: the checkpoint the survivors resumed from (goal 0), and the bytes
  of copies read from peers' memory instead;
* ``equal_after_loss``: max relative loss difference after the loss at step s against two
  processes saving at s and one process resuming from that disk checkpoint (goal <= 1e-3);
* ``rejoin_s``: host 1 started again -> the first step with it in the world, with the bytes the
  grown world read (from disk or memory) and the rate.

The peer row, measured in the same run: the same loss under a fixed ``--nnodes 2`` (the job
stops), timed from the SIGKILL to the survivor's exit.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import ROOT, human_bytes, print_table, write_json  # noqa: E402
from launcher.replica_store import BASE_ENV as REPLICA_BASE_ENV  # noqa: E402
from tests.support.netns import free_port_in, net_hosts  # noqa: E402

STEP = re.compile(r"\] step (\d+)/")
AUTO = re.compile(r"every=auto: .* copies every (\d+) step")
COPIES = re.compile(r"peer replicas: (\d+) copies .* the copy threads ([\d.]+)s of CPU")
RESUMED = re.compile(
    r"resumed from (?:(\S+/step_(\d+))|peer memory at step (\d+) \((\d+) bytes\), 0 from disk) \(restart"
)


class Node:
    """One host's ``disttrain launch``; stdout lines are kept with the time they arrived."""

    heartbeat_timeout = 5.0
    threads = 0  # torch threads per worker (OMP_NUM_THREADS); 0: torch's default (every core)

    def __init__(self, hosts, i: int, nnodes: str, port: int, secret: str, config: str):
        env = {**os.environ, "GLOO_SOCKET_IFNAME": hosts.ifname, "DISTTRAIN_JOB_SECRET": secret}
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
        argv = [sys.executable, "-m", "launcher.cli", "--nnodes", nnodes, "--node-rank", str(i)]
        argv += ["--rdzv-endpoint", f"{hosts.addrs[0]}:{port}", "--nproc-per-node", "1"]
        argv += ["--heartbeat-timeout", str(self.heartbeat_timeout), "-m", "disttrain.worker", config]
        self.proc = hosts.popen(
            i, argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line))

    def first(self, pattern: re.Pattern, after: float = 0.0, timeout: float = 300.0) -> tuple[float, re.Match]:
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for t, line in self.lines[seen:]:
                m = pattern.search(line)
                if t >= after and m:
                    return t, m
            seen = len(self.lines)
            if time.monotonic() > deadline or (self.proc.poll() is not None and seen == len(self.lines)):
                raise SystemExit(f"no {pattern.pattern!r} in the output:\n" + "".join(x for _, x in self.lines[-30:]))
            time.sleep(0.02)

    def last_step(self, before: float) -> int:
        return max(int(m.group(1)) for t, line in self.lines if t < before and (m := STEP.search(line)))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _kill_host(hosts, i: int) -> None:
    for _ in range(50):
        pids = hosts.pids(i)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.02)


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _config(
    tmp: str, name: str, strategy: str, steps: int, every: int, replicas: int | str, recover: str = "restart"
) -> str:
    from disttrain import config as config_mod

    overrides = [
        f"run.dir={tmp}/{name}",
        "launch.backend=torch",
        "model.d_model=128",
        "model.n_layer=2",
        "model.seq_len=64",
        f"train.steps={steps}",
        "train.log_every=1",
        "train.eval_every=0",
        f"checkpoint.every={every}",
        "checkpoint.keep=100",
        f"parallel.strategy={strategy}",
        f"fault_tolerance.every={replicas}",
        f"fault_tolerance.recover={recover}",
    ]
    cfg = config_mod.load(os.path.join(ROOT, "configs", "gpt-shakespeare.yaml"), overrides)
    path = os.path.join(tmp, f"{name}.yaml")
    config_mod.save(cfg, path)
    return path


def _resumed(m: re.Match) -> tuple[int, int, int]:
    """(step, bytes read from disk, bytes read from peers' memory) of a "resumed from" line."""
    if m.group(1):
        return int(m.group(2)), _dir_bytes(m.group(1)), 0
    return int(m.group(3)), 0, int(m.group(4))


def run_elastic(
    tmp: str, strategy: str, steps: int, every: int, kill_at: int, replicas: int | str, warm: int, recover: str
) -> dict:
    name = f"{strategy}-{'memory' if replicas else 'disk'}-{recover}"
    config = _config(tmp, name, strategy, steps, every, replicas, recover)
    with net_hosts(2, sshd=False) as hosts:
        port, secret = free_port_in(hosts, 0), secrets.token_hex(32)
        nodes = [Node(hosts, i, "1:2", port, secret, config) for i in range(2)]
        try:
            t_kill, _ = nodes[0].first(re.compile(rf"\] step {kill_at}/"))
            killed = time.monotonic()
            _kill_host(hosts, 1)
            t_warm, _ = nodes[0].first(re.compile(rf"\] step {warm}/"))
            step_s = (t_kill - t_warm) / (kill_at - warm)  # steady state at world 2, before the loss
            done_before = nodes[0].last_step(killed)
            t_res, m = nodes[0].first(RESUMED, after=killed)
            resumed, disk_read, memory_read = _resumed(m)
            t_step, _ = nodes[0].first(STEP, after=t_res)
            back = time.monotonic()
            nodes.append(Node(hosts, 1, "1:2", port, secret, config))
            t_res2, m2 = nodes[0].first(RESUMED, after=back)
            t_step2, _ = nodes[0].first(STEP, after=t_res2)
            _, rejoin_disk, rejoin_memory = _resumed(m2)
            if nodes[0].proc.wait(600) != 0:
                raise SystemExit(f"{name}: the job failed:\n" + "".join(x for _, x in nodes[0].lines[-30:]))
        finally:
            for n in nodes:
                n.stop()
    rejoin_s = t_step2 - back
    rejoin_bytes = rejoin_disk + rejoin_memory
    chosen = [int(m.group(1)) for _, line in nodes[0].lines if (m := AUTO.search(line))]
    return {
        "strategy": strategy,
        "recovery_from": "memory" if memory_read else "disk",
        "recover": recover,
        "fault_tolerance.every": replicas,
        "auto_every_chosen": chosen or None,  # every=auto: the k each round of host 0's workers picked
        "mode": "--nnodes 1:2",
        "step_s": round(step_s, 4),
        "recovery_s": round(t_step - killed, 2),
        "resumed_step": resumed,
        "steps_lost": done_before - resumed,
        "recovery_disk_bytes_read": disk_read,
        "recovery_memory_bytes_read": memory_read,
        "rejoin_s": round(rejoin_s, 2),
        "rejoin_bytes": rejoin_bytes,
        "rejoin_from": "memory" if rejoin_memory else "disk",
        "rejoin_bytes_per_s": round(rejoin_bytes / rejoin_s),
        "run_dir": os.path.join(tmp, name),
        "config": config,
    }


def _step_times(node: Node, first: int) -> list[float]:
    """Seconds between consecutive step lines from step ``first`` on (one host's log)."""
    at = {int(m.group(1)): t for t, line in node.lines if (m := STEP.search(line))}
    return [at[k] - at[k - 1] for k in sorted(at) if k > first and k - 1 in at]


def steady_overhead(tmp: str, strategy: str, every: int, replica_every: int | str, rounds: int, steps: int) -> dict:
    """Step time with replicas off and on, alternated (off, on, off, on, ...) on the same two
    namespaces so that load from elsewhere hits both alike; medians of the step intervals."""
    times: dict[int | str, list[float]] = {0: [], replica_every: []}
    chosen: list[int] = []  # every=auto: the k each on-run picked
    copy_cpu: list[float] = []  # rank 0's copy thread CPU seconds per copy, per on-run
    with net_hosts(2, sshd=False) as hosts:
        for r in range(rounds):
            for rep in (0, replica_every):
                config = _config(tmp, f"{strategy}-steady{r}-{rep}", strategy, steps, every, rep)
                port, secret = free_port_in(hosts, 0), secrets.token_hex(32)
                nodes = [Node(hosts, i, "1:2", port, secret, config) for i in range(2)]
                try:
                    if nodes[0].proc.wait(600) != 0:
                        raise SystemExit("".join(x for _, x in nodes[0].lines[-30:]))
                    nodes[0]._reader.join(10)
                finally:
                    for n in nodes:
                        n.stop()
                times[rep] += _step_times(nodes[0], 5)
                chosen += [int(m.group(1)) for _, line in nodes[0].lines if rep and (m := AUTO.search(line))]
                copy_cpu += [
                    float(m.group(2)) / int(m.group(1))
                    for _, line in nodes[0].lines
                    if rep and (m := COPIES.search(line)) and int(m.group(1))
                ]
    off, on = statistics.median(times[0]), statistics.median(times[replica_every])
    return {
        "step_s_off": round(off, 4),
        "step_s_on": round(on, 4),
        "replication_overhead": round(on / off, 3),
        "auto_every_chosen": chosen or None,
        "copy_thread_cpu_ms": round(statistics.median(copy_cpu) * 1e3, 2) if copy_cpu else None,
    }


def _launch_run(config: str, nproc: int, overrides: list[str]) -> str:
    from disttrain import config as config_mod

    cfg = config_mod.load(config, overrides)
    path = config + f".ref{nproc}.yaml"
    config_mod.save(cfg, path)
    res = subprocess.run(
        [sys.executable, "-m", "disttrain.cli", "run", path, "--nproc", str(nproc)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=1200,
    )
    if res.returncode:
        raise SystemExit(f"reference run failed:\n{res.stdout[-2000:]}{res.stderr[-2000:]}")
    return res.stdout


def equal_after_loss(row: dict) -> float:
    """Max relative loss difference after step s between the run that lost a host (resumed from
    peers' memory at s) and two processes saving at s then one process resuming from that disk
    checkpoint (the same global batch)."""
    s, ref = row["resumed_step"], row["run_dir"] + "-ref"
    over = [f"run.dir={ref}", f"checkpoint.every={s}", "fault_tolerance.every=0"]
    _launch_run(row["config"], 2, over)
    ckpts = os.path.join(ref, "checkpoints")
    for name in os.listdir(ckpts):
        m = re.fullmatch(r"step_(\d+)", name)
        if m and int(m.group(1)) > s:
            shutil.rmtree(os.path.join(ckpts, name))
    open(os.path.join(ref, "metrics.jsonl"), "w").close()
    _launch_run(row["config"], 1, over)

    def losses(run_dir: str) -> dict[int, float]:
        rows = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl")) if x.strip()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r and r["step"] > s}

    a, b = losses(row["run_dir"]), losses(ref)
    if not a or sorted(a) != sorted(b):
        raise SystemExit(f"{row['strategy']}: the runs logged different steps after {s}")
    return max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-12) for k in a)


def run_fixed(tmp: str, strategy: str, steps: int, every: int, kill_at: int) -> dict:
    """The peer: fixed --nnodes 2; the survivor stops. Time from SIGKILL to its exit."""
    config = _config(tmp, f"{strategy}-fixed", strategy, steps, every, 0)
    with net_hosts(2, sshd=False) as hosts:
        port, secret = free_port_in(hosts, 0), secrets.token_hex(32)
        nodes = [Node(hosts, i, "2", port, secret, config) for i in range(2)]
        try:
            nodes[0].first(re.compile(rf"\] step {kill_at}/"))
            killed = time.monotonic()
            _kill_host(hosts, 1)
            code = nodes[0].proc.wait(600)
            stopped = time.monotonic() - killed
        finally:
            for n in nodes:
                n.stop()
    return {"strategy": strategy, "mode": "--nnodes 2 (stops)", "exit_code": code, "stop_s": round(stopped, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default="results/fault_tolerance.json")
    p.add_argument("--strategies", default="ddp,zero3")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--every", type=int, default=10, help="steps between disk checkpoints")
    p.add_argument(
        "--replica-every",
        type=lambda v: v if v == "auto" else int(v),
        default=1,
        help="fault_tolerance.every of the memory rows (a step count or auto)",
    )
    p.add_argument("--kill-at", type=int, default=25, help="SIGKILL host 1 once host 0 logged this step")
    p.add_argument("--warm", type=int, default=5, help="step time is measured from this step to --kill-at")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads per worker (OMP_NUM_THREADS). 0: torch's default, every core per worker (the 2 "
        "simulated hosts oversubscribe the machine; libgomp's spin-waits both slow the step and leave slack "
        "a copy can use); cores/2: each simulated host has its own share and no idle core",
    )
    p.add_argument("--heartbeat-timeout", type=float, default=5.0, help="disttrain launch --heartbeat-timeout")
    p.add_argument("--rounds", type=int, default=3, help="alternated off/on runs for replication_overhead")
    p.add_argument("--steady-steps", type=int, default=40, help="steps of each of those runs")
    p.add_argument("--no-peer", action="store_true", help="skip the fixed --nnodes 2 peer rows")
    p.add_argument("--no-equal", action="store_true", help="skip the reference runs of equal_after_loss")
    p.add_argument(
        "--recover", default="both", choices=["both", "restart", "in_place"], help="fault_tolerance.recover rows"
    )
    ns = p.parse_args()
    Node.heartbeat_timeout, Node.threads = ns.heartbeat_timeout, ns.threads
    import tempfile

    rows, peers = [], []
    # killed agents leave their private directories: ours go in a directory of this run, removed at the end
    shm_parent = tempfile.mkdtemp(
        prefix="dt-bench-replicas-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    )
    os.environ[REPLICA_BASE_ENV] = shm_parent
    with tempfile.TemporaryDirectory(prefix="ft-bench-") as tmp:
        for strategy in ns.strategies.split(","):
            kinds = [(0, "restart"), (ns.replica_every, "restart"), (ns.replica_every, "in_place")]
            if ns.recover != "both":
                kinds = [(0, "restart"), (ns.replica_every, ns.recover)]
            trio = [run_elastic(tmp, strategy, ns.steps, ns.every, ns.kill_at, ev, ns.warm, rec) for ev, rec in kinds]
            off, *on = trio
            off["replication_overhead"] = off["equal_after_loss"] = None  # test_launcher_elastic checks the disk path
            steady = (
                steady_overhead(tmp, strategy, ns.every, ns.replica_every, ns.rounds, ns.steady_steps)
                if ns.rounds
                else {"replication_overhead": None}
            )
            for row in on:
                row.update(steady)
                row["equal_after_loss"] = None if ns.no_equal else equal_after_loss(row)
            rows += trio
            if not ns.no_peer:
                peers.append(run_fixed(os.path.join(tmp, "fixed"), strategy, ns.steps, ns.every, ns.kill_at))
    shutil.rmtree(shm_parent, ignore_errors=True)
    for r in rows:
        r.pop("run_dir"), r.pop("config")
    print_table(
        f"Lose host 1 of 2 (SIGKILL), go on alone, take it back (GPT, 1 worker per host, heartbeat timeout "
        f"{ns.heartbeat_timeout:g}s, disk checkpoint every {ns.every} steps)",
        [
            "strategy",
            "from",
            "recover",
            "step_s",
            "overhead",
            "recovery_s",
            "steps_lost",
            "disk read",
            "memory read",
            "equal",
            "rejoin_s",
            "rejoin read",
            "rejoin rate",
        ],
        [
            [
                r["strategy"],
                r["recovery_from"],
                r["recover"],
                f"{r['step_s']:.3f}",
                "-"
                if r["replication_overhead"] is None
                else f"{r['replication_overhead']:.3f}"
                + (f" (k={','.join(map(str, r['auto_every_chosen']))})" if r.get("auto_every_chosen") else ""),
                f"{r['recovery_s']:.1f}",
                r["steps_lost"],
                human_bytes(r["recovery_disk_bytes_read"]),
                human_bytes(r["recovery_memory_bytes_read"]),
                "-" if r["equal_after_loss"] is None else f"{r['equal_after_loss']:.2g}",
                f"{r['rejoin_s']:.1f}",
                f"{human_bytes(r['rejoin_bytes'])} ({r['rejoin_from']})",
                human_bytes(r["rejoin_bytes_per_s"]) + "/s",
            ]
            for r in rows
        ],
    )
    if peers:
        print_table(
            "Peer: fixed --nnodes 2, the survivor stops",
            ["strategy", "exit code", "stop_s"],
            [[r["strategy"], r["exit_code"], f"{r['stop_s']:.1f}"] for r in peers],
        )
    write_json(
        ns.json,
        {
            "config": vars(ns),
            "rows": rows,
            "peers": peers,
            "not_built": ["in-place recovery on mpi (it cannot abort a collective: restart)"],
        },
    )
    print(f"wrote {ns.json}")


if __name__ == "__main__":
    main()
