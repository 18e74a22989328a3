"""Losing a host and getting it back: the GPT example on 2 hosts (network namespaces, as the
launcher's tests use; needs root and iproute2), each started torchrun-style with ``--nnodes 1:2``.

    python benchmarks/fault_tolerance.py --json results/fault_tolerance.json [--strategies ddp,zero3]

Per strategy: train, SIGKILL host 1 (its agent and workers) mid-run, let host 0 go on alone,
then start host 1 again with the same command and let it rejoin. Columns:

* ``recovery_s``: SIGKILL -> the survivors' first completed step (goal <= 10);
* ``steps_lost``: steps done before the loss and redone after it (goal <= 1);
* ``recovery_disk_bytes_read``: the checkpoint the survivors resumed from (recovery reads it
  from disk today: the in-memory peer replicas that would make this 0 are not built);
* ``rejoin_s``: host 1 started again -> the first step with it in the world, with the bytes
  of checkpoint the grown world read and the rate.

The peer row, measured in the same run: the same loss under a fixed ``--nnodes 2`` (the job
stops), timed from the SIGKILL to the survivor's exit. ``replication_overhead`` and a
recovery without disk are null: peer replicas are not built. ``equal_after_loss`` is checked
by tests/test_launcher_elastic.py.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import ROOT, human_bytes, print_table, write_json  # noqa: E402
from tests.support.netns import free_port_in, net_hosts  # noqa: E402

STEP = re.compile(r"\] step (\d+)/")
RESUMED = re.compile(r"resumed from (\S+/step_(\d+)) \(restart (\d+)\)")


class Node:
    """One host's ``disttrain launch``; stdout lines are kept with the time they arrived."""

    heartbeat_timeout = 5.0

    def __init__(self, hosts, i: int, nnodes: str, port: int, secret: str, config: str):
        env = {**os.environ, "GLOO_SOCKET_IFNAME": hosts.ifname, "DISTTRAIN_JOB_SECRET": secret}
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


def _config(tmp: str, strategy: str, steps: int, every: int) -> str:
    from disttrain import config as config_mod

    overrides = [
        f"run.dir={tmp}/{strategy}",
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
    ]
    cfg = config_mod.load(os.path.join(ROOT, "configs", "gpt-shakespeare.yaml"), overrides)
    path = os.path.join(tmp, f"{strategy}.yaml")
    config_mod.save(cfg, path)
    return path


def run_elastic(tmp: str, strategy: str, steps: int, every: int, kill_at: int) -> dict:
    config = _config(tmp, strategy, steps, every)
    with net_hosts(2, sshd=False) as hosts:
        port, secret = free_port_in(hosts, 0), secrets.token_hex(32)
        nodes = [Node(hosts, i, "1:2", port, secret, config) for i in range(2)]
        try:
            nodes[0].first(re.compile(rf"\] step {kill_at}/"))
            killed = time.monotonic()
            _kill_host(hosts, 1)
            done_before = nodes[0].last_step(killed)
            t_res, m = nodes[0].first(RESUMED, after=killed)
            ckpt, resumed = m.group(1), int(m.group(2))
            t_step, _ = nodes[0].first(STEP, after=t_res)
            back = time.monotonic()
            nodes.append(Node(hosts, 1, "1:2", port, secret, config))
            t_res2, m2 = nodes[0].first(RESUMED, after=back)
            t_step2, _ = nodes[0].first(STEP, after=t_res2)
            rejoin_bytes = _dir_bytes(m2.group(1))
            if nodes[0].proc.wait(600) != 0:
                raise SystemExit(f"{strategy}: the job failed:\n" + "".join(x for _, x in nodes[0].lines[-30:]))
        finally:
            for n in nodes:
                n.stop()
    rejoin_s = t_step2 - back
    return {
        "strategy": strategy,
        "mode": "--nnodes 1:2",
        "recovery_s": round(t_step - killed, 2),
        "steps_lost": done_before - resumed,
        "recovery_disk_bytes_read": _dir_bytes(ckpt),
        "rejoin_s": round(rejoin_s, 2),
        "rejoin_bytes": rejoin_bytes,
        "rejoin_bytes_per_s": round(rejoin_bytes / rejoin_s),
        "replication_overhead": None,
        "equal_after_loss": None,
    }


def run_fixed(tmp: str, strategy: str, steps: int, every: int, kill_at: int) -> dict:
    """The peer: fixed --nnodes 2; the survivor stops. Time from SIGKILL to its exit."""
    config = _config(tmp, f"{strategy}", steps, every)
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
    p.add_argument("--kill-at", type=int, default=25, help="SIGKILL host 1 once host 0 logged this step")
    p.add_argument("--heartbeat-timeout", type=float, default=5.0, help="disttrain launch --heartbeat-timeout")
    ns = p.parse_args()
    Node.heartbeat_timeout = ns.heartbeat_timeout
    import tempfile

    rows, peers = [], []
    with tempfile.TemporaryDirectory(prefix="ft-bench-") as tmp:
        for strategy in ns.strategies.split(","):
            rows.append(run_elastic(tmp, strategy, ns.steps, ns.every, ns.kill_at))
            peers.append(run_fixed(os.path.join(tmp, "fixed"), strategy, ns.steps, ns.every, ns.kill_at))
    print_table(
        f"Lose host 1 of 2 (SIGKILL), go on alone, take it back (GPT, 1 worker per host, "
        f"heartbeat timeout {ns.heartbeat_timeout:g}s)",
        ["strategy", "recovery_s", "steps_lost", "disk read", "rejoin_s", "rejoin read", "rejoin rate"],
        [
            [
                r["strategy"],
                f"{r['recovery_s']:.1f}",
                r["steps_lost"],
                human_bytes(r["recovery_disk_bytes_read"]),
                f"{r['rejoin_s']:.1f}",
                human_bytes(r["rejoin_bytes"]),
                human_bytes(r["rejoin_bytes_per_s"]) + "/s",
            ]
            for r in rows
        ],
    )
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
            "not_built": ["peer replicas in host memory", "recovery without disk", "Horovod elastic"],
        },
    )
    print(f"wrote {ns.json}")


if __name__ == "__main__":
    main()
