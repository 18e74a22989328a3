"""Losing a host: network namespaces as hosts (tests/support/netns.py), each node started
torchrun-style (``--nnodes --node-rank --rdzv-endpoint``; node 0 hosts the store).

- A host SIGKILLed (agent and workers): the survivor learns it from the heartbeats within
  seconds and exits with a report naming the lost host (fixed ``--nnodes 2``).
- A partition isolates one of three hosts under ``--nnodes 2:3``: the majority goes on at the
  smaller size, the cut-off host stops its workers and exits non-zero.
- A host SIGKILLed under ``--nnodes 1:2`` and started again with the same command: the job
  shrinks to one host, and grows back to two at the next round.
- A host lost under ddp and zero3 with ``--nnodes 1:2``: the survivor resumes from the latest
  disk checkpoint at world size 1 and ends where a run that changed to world size 1 at that
  checkpoint ends (same global batch; tolerance 1e-6 on every parameter and logged loss:
  both runs execute the same steps on the same layout, only thread timing differs).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from disttrain import config as config_mod
from disttrain.checkpoint import CheckpointReader, resolve
from tests.support.netns import free_port_in, net_hosts, skip_reason

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "cases", "elastic_worker.py")
TOL = 1e-6


def _no_netns() -> str | None:
    """These tests start nodes torchrun-style inside namespaces: no sshd needed."""
    reason = skip_reason()
    return reason if reason and "sshd" not in reason else None


pytestmark = pytest.mark.skipif(_no_netns() is not None, reason=f"multi-host tests skipped: {_no_netns()}")


class Node:
    """One host's ``disttrain launch``; its output is collected by threads as it comes."""

    def __init__(self, hosts, i: int, nnodes: str, port: int, secret: str, args: list[str], nproc: int = 1):
        env = {**os.environ, "GLOO_SOCKET_IFNAME": hosts.ifname, "DISTTRAIN_JOB_SECRET": secret}
        argv = [sys.executable, "-m", "launcher.cli", "--nnodes", nnodes, "--node-rank", str(i)]
        argv += ["--rdzv-endpoint", f"{hosts.addrs[0]}:{port}", "--nproc-per-node", str(nproc), *args]
        self.proc = hosts.popen(i, argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self.ended_at: float | None = None
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for t in self._readers:
            t.start()

    @staticmethod
    def _read(stream, sink: list[str]) -> None:
        for line in stream:
            sink.append(line)

    def wait_for(self, pattern: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, "".join(self.out)):
            assert self.proc.poll() is None, f"ended before {pattern!r}: " + self.text()
            assert time.monotonic() < deadline, f"no {pattern!r} within {timeout}s: " + self.text()
            time.sleep(0.05)

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self.ended_at = time.monotonic()
        for t in self._readers:
            t.join(5)
        return code

    def text(self) -> str:
        return "".join(self.out)[-3000:] + "\n--- stderr ---\n" + "".join(self.err)[-4000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _kill_host(hosts, i: int) -> None:
    """SIGKILL everything on host ``i`` (agent and workers), as a machine that dies."""
    for _ in range(50):
        pids = hosts.pids(i)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def _no_leftovers(hosts, i: int) -> None:
    deadline = time.monotonic() + 10
    while hosts.pids(i) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert hosts.pids(i) == [], f"processes left behind on host {i}"


def _start(hosts, nnodes: str, args: list[str], nproc: int = 1) -> list[Node]:
    port, secret = free_port_in(hosts, 0), secrets.token_hex(32)
    n = int(nnodes.split(":")[-1])
    return [Node(hosts, i, nnodes, port, secret, args, nproc) for i in range(n)]


@pytest.mark.timeout(120)
def test_a_killed_host_is_named_by_the_survivor_within_seconds(tmp_path):
    with net_hosts(2, sshd=False) as hosts:
        nodes = _start(hosts, "2", [WORKER, "1000", str(tmp_path)])
        try:
            nodes[0].wait_for(r"step 3 world 2", 60)
            killed = time.monotonic()
            _kill_host(hosts, 1)
            code = nodes[0].wait(60)
            seconds = nodes[0].ended_at - killed
        finally:
            for n in nodes:
                n.kill()
        print(f"survivor's agent exited {seconds:.1f}s after the SIGKILL of host 1")
        err = "".join(nodes[0].err)
        assert code == 1, nodes[0].text()
        assert re.search(r"host\(s\) \S+ \(node 1\) lost", err), nodes[0].text()  # hosts share a hostname here
        assert "HINT: --nnodes MIN:2" in err
        _no_leftovers(hosts, 0)


@pytest.mark.timeout(150)
def test_a_partition_stops_the_minority_and_the_majority_goes_on(tmp_path):
    with net_hosts(3, sshd=False) as hosts:
        nodes = _start(hosts, "2:3", [WORKER, "25", str(tmp_path)])
        try:
            for n in nodes:
                n.wait_for(r"step 2 world 3", 60)
            cut = time.monotonic()
            subprocess.run(["ip", "-n", hosts.namespaces[2], "link", "set", "eth0", "down"], check=True)
            minority = nodes[2].wait(60)
            print(f"the cut-off host stopped {nodes[2].ended_at - cut:.1f}s after the partition")
            written = (tmp_path / "rank2-attempt0.log").read_text()
            codes = [n.wait(90) for n in nodes[:2]]
        finally:
            for n in nodes:
                n.kill()
        assert minority == 1 and "cut off from the job's store" in "".join(nodes[2].err), nodes[2].text()
        assert codes == [0, 0], nodes[0].text() + nodes[1].text()
        out = "".join(nodes[0].out)
        assert "step 24 world 2 attempt 1" in out, nodes[0].text()
        err = "".join(nodes[0].err)
        assert re.search(r"round 1: .*lost \S+; world 3 -> 2", err), nodes[0].text()
        assert "1 membership transition(s)" in err
        _no_leftovers(hosts, 2)
        time.sleep(1.0)  # the stopped host wrote nothing after its agent exited
        assert (tmp_path / "rank2-attempt0.log").read_text() == written
        assert not (tmp_path / "rank2-attempt1.log").exists()


@pytest.mark.timeout(150)
def test_a_host_that_comes_back_joins_at_the_next_round(tmp_path):
    with net_hosts(2, sshd=False) as hosts:
        port, secret = free_port_in(hosts, 0), secrets.token_hex(32)
        args = [WORKER, "60", str(tmp_path)]
        nodes = [Node(hosts, i, "1:2", port, secret, args) for i in range(2)]
        try:
            nodes[0].wait_for(r"step 2 world 2", 60)
            _kill_host(hosts, 1)
            nodes[0].wait_for(r"step 1 world 1 attempt 1", 60)
            back = time.monotonic()
            nodes.append(Node(hosts, 1, "1:2", port, secret, args))  # the same command, on the same host
            nodes[2].wait_for(r"step 0 world 2 attempt 2", 60)
            print(f"host 1 came back; its first step in the world {time.monotonic() - back:.1f}s after its restart")
            codes = [nodes[0].wait(90), nodes[2].wait(90)]
        finally:
            for n in nodes:
                n.kill()
        assert codes == [0, 0], nodes[0].text() + nodes[2].text()
        assert "step 59 world 2 attempt 2" in "".join(nodes[0].out), nodes[0].text()
        err = "".join(nodes[0].err)
        assert re.search(r"round 1: .*lost \S+; world 2 -> 1", err), nodes[0].text()
        assert re.search(r"round 2: host \S+ came back .*joined \S+; world 1 -> 2", err), nodes[0].text()
        assert "2 membership transition(s)" in err
        _no_leftovers(hosts, 0)
        _no_leftovers(hosts, 1)


def _params(run_dir: str) -> tuple[int, dict]:
    reader = CheckpointReader(resolve(run_dir)[0])
    out = {}
    for name in sorted(n for n in reader.names if n.startswith("model.")):
        shape = reader.shape(name)
        out[name] = reader(name, shape, tuple((0, s) for s in shape))
    return reader.step, out


def _losses(run_dir: str, after: int) -> dict[int, float]:
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r and r["step"] > after}  # the last record of a step wins


@pytest.mark.timeout(240)
@pytest.mark.parametrize("strategy", ["ddp", "zero3"])
def test_a_host_lost_mid_training_continues_at_the_smaller_size(tmp_path, strategy):
    run_dir, steps = str(tmp_path / "run"), 300
    overrides = [
        f"run.dir={run_dir}",
        f"train.steps={steps}",
        "train.log_every=1",
        "train.eval_every=0",
        "checkpoint.every=10",
        "checkpoint.keep=100",
        f"parallel.strategy={strategy}",
    ]
    cfg = config_mod.load(os.path.join(ROOT, "configs", "digits.yaml"), overrides)
    resolved = str(tmp_path / "run.yaml")
    config_mod.save(cfg, resolved)
    with net_hosts(2, sshd=False) as hosts:
        nodes = _start(hosts, "1:2", ["-m", "disttrain.worker", resolved])
        try:
            nodes[0].wait_for(r"step 2[0-9]/", 120)
            killed = time.monotonic()
            _kill_host(hosts, 1)
            nodes[0].wait_for(r"resumed from \S+/step_\d+ \(restart 1\)", 60)
            resumed = time.monotonic() - killed
            code = nodes[0].wait(120)
        finally:
            for n in nodes:
                n.kill()
    assert code == 0, nodes[0].text()
    out, err = "".join(nodes[0].out), "".join(nodes[0].err)
    s = int(re.search(r"resumed from \S+/step_(\d+) \(restart 1\)", out).group(1))
    print(f"{strategy}: host 1 lost; workers resumed from step {s} at world 1, {resumed:.1f}s after the SIGKILL")
    assert re.search(r"round 1: .*lost \S+; world 2 -> 1", err), nodes[0].text()
    assert f"done: {steps} steps on 1 ranks" in out or f"{steps}/{steps}" in out, nodes[0].text()

    # The reference: the same run directory up to step s, resumed by one process.
    ref_dir = str(tmp_path / "ref")
    shutil.copytree(run_dir, ref_dir)
    ckpts = os.path.join(ref_dir, "checkpoints")
    for name in os.listdir(ckpts):
        m = re.fullmatch(r"step_(\d+)", name)
        if m and int(m.group(1)) > s:
            shutil.rmtree(os.path.join(ckpts, name))
    with open(os.path.join(ref_dir, "metrics.jsonl"), "w"):
        pass
    ref_cfg = config_mod.load(resolved, [f"run.dir={ref_dir}"])
    ref_yaml = str(tmp_path / "ref.yaml")
    config_mod.save(ref_cfg, ref_yaml)
    ref = subprocess.run(
        [sys.executable, "-m", "disttrain.cli", "run", ref_yaml, "--nproc", "1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=180,
    )
    assert ref.returncode == 0, ref.stdout[-2000:] + ref.stderr[-2000:]
    assert f"resumed from {ckpts}/step_{s:06d}" in ref.stdout, ref.stdout[-2000:]

    (step_a, a), (step_b, b) = _params(run_dir), _params(ref_dir)
    assert step_a == step_b == steps and a.keys() == b.keys() and a
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= TOL, f"parameters differ by {worst:.3g} from the run that changed size at step {s}"
    la, lb = _losses(run_dir, s), _losses(ref_dir, s)
    assert sorted(la) == sorted(lb) == list(range(s + 1, steps + 1))
    worst_loss = max(abs(la[k] - lb[k]) / max(abs(lb[k]), 1e-12) for k in la)
    print(f"{strategy}: loss after the loss vs the resized reference: max relative difference {worst_loss:.3g}")
    assert worst_loss <= TOL
