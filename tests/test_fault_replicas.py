"""Losing a host with peer replicas on (``fault_tolerance.every=1``): network namespaces as hosts,
each node started torchrun-style with ``--nnodes 1:2`` (tests/test_launcher_elastic.py's harness).

Under ddp, a third host that is not part of the job (no secret) attacks every port host 0 listens
on (the job store, the replica store) from step 5 on, while the loss below happens: every handshake
is refused, host 0's agent logs it with the attacker's address, and the job goes on.

A host SIGKILLed (agent and workers) under ddp and zero3: the survivor's new worker resumes from
the copies in the surviving agent's memory, with no disk checkpoint to read (``checkpoint.every=0``:
none exists before the end), at most one step lost, and ends where a run that changed to world size 1
at the same step from a disk checkpoint ends (same global batch).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from disttrain import config as config_mod
from tests.support.netns import net_hosts
from tests.support.resized import check_equals_resized_run, run_until
from tests.test_launcher_elastic import ROOT, _kill_host, _no_netns, _start

pytestmark = pytest.mark.skipif(_no_netns() is not None, reason=f"multi-host tests skipped: {_no_netns()}")
RESUMED = r"resumed from peer memory at step (\d+) \(\d+ bytes\), 0 from disk \(restart 1\)"
TOL = 1e-5  # parameters; the reference runs the same steps on the same layout in other processes
ATTACK = """
import secrets, sys
from launcher.store import StoreClient, StoreError
for a in sys.argv[1:]:
    try:
        StoreClient(a, secrets.token_hex(32), timeout=2, connect_timeout=2, job="job-x").set("c/0/steps", b"[9]")
        print("ACCEPTED", a)
    except StoreError as exc:
        print("refused", a, type(exc).__name__)
"""


def _attack_from_outside(hosts) -> str:
    """From host 2 (not in the job, no secret): a store handshake to every TCP port host 0 listens on."""
    listening = hosts.run(0, ["ss", "-Htln"]).stdout.split()
    ports = sorted({a.rpartition(":")[2] for a in listening if a.startswith(hosts.addrs[0] + ":")})
    res = hosts.run(2, [sys.executable, "-c", ATTACK, *(f"{hosts.addrs[0]}:{p}" for p in ports)], cwd=ROOT)
    assert res.returncode == 0 and "ACCEPTED" not in res.stdout, res.stdout + res.stderr
    assert res.stdout.count("refused") >= 2, res.stdout  # the job store and the replica store at least
    return res.stdout


def _config(tmp_path, name: str, strategy: str, steps: int, extra: list[str]) -> str:
    overrides = [
        f"run.dir={tmp_path / name}",
        f"train.steps={steps}",
        "train.log_every=1",
        "train.eval_every=0",
        "train.batch_size=512",  # tens of ms a step: the loss lands mid-run, not after the last step
        "checkpoint.keep=1000",
        f"parallel.strategy={strategy}",
        *extra,
    ]
    cfg = config_mod.load(os.path.join(ROOT, "configs", "digits.yaml"), overrides)
    path = str(tmp_path / f"{name}.yaml")
    config_mod.save(cfg, path)
    return path


def _run(yaml: str, nproc: int) -> str:
    res = subprocess.run(
        [sys.executable, "-m", "disttrain.cli", "run", yaml, "--nproc", str(nproc)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=180,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return res.stdout


@pytest.mark.timeout(300)
@pytest.mark.parametrize("strategy,every", [("ddp", "1"), ("zero3", "auto")])
def test_a_lost_host_resumes_from_peer_memory_and_equals_a_resized_run(tmp_path, strategy, every):
    steps = 120
    run_yaml = _config(tmp_path, "run", strategy, steps, ["checkpoint.every=0", f"fault_tolerance.every={every}"])
    with net_hosts(3 if strategy == "ddp" else 2, sshd=False) as hosts:
        nodes = _start(hosts, "1:2", ["--heartbeat-timeout", "2", "-m", "disttrain.worker", run_yaml])
        try:
            attack = None
            if strategy == "ddp":  # in the background: its Python starts slower than steps go by
                nodes[0].wait_for(r"step 5/", 120)
                attack = ThreadPoolExecutor(1).submit(_attack_from_outside, hosts)
            nodes[0].wait_for(r"step 2[0-9]/", 120)
            killed = time.monotonic()
            _kill_host(hosts, 1)
            nodes[0].wait_for(RESUMED, 60)
            resumed_after = time.monotonic() - killed
            if attack is not None:
                attack.result(60)
            code = nodes[0].wait(120)
        finally:
            for n in nodes:
                n.kill()
    out, err = "".join(nodes[0].out), "".join(nodes[0].err)
    assert code == 0, nodes[0].text()
    m = re.search(RESUMED, out)
    s = int(m.group(1))
    done_before = max(int(x) for x in re.findall(r"\] step (\d+)/", out[: m.start()]))
    print(f"{strategy}: resumed from peer memory at step {s} ({done_before - s} step(s) lost), {resumed_after:.1f}s")
    # every=auto measured and chose k (rank 0 says so): at most k steps are at risk
    k = int(re.search(r"every=auto: .* copies every (\d+) step", out).group(1)) if every == "auto" else 1
    assert done_before - s <= k, f"{done_before - s} steps lost, copies every {k}"
    assert "resumed from /" not in out, "a disk checkpoint was read"
    # world 1 after the loss: its copies went to its own agent through the shared segment, none on a socket
    # the copies of rank 1 (world 2) are freed once world 1 has a complete copy; the holder says how many bytes
    freed = re.search(r"freed (\d+) bytes of copies of ranks 1\.\.1 \(world 2 -> 1\) at step (\d+)", out)
    assert freed and int(freed.group(1)) > 0 and int(freed.group(2)) > s, out
    assert re.search(r"peer replicas: [1-9]\d* copies \(0\.0 MiB sent by rank 0\), \d+ waited .*, 0 failed", out), out
    assert re.search(r"round 1: .*lost \S+; world 2 -> 1", err), nodes[0].text()
    if strategy == "ddp":  # the attack was refused and logged with its address; the job went on
        assert f"rejected connection from {hosts.addrs[2]}" in err, err[-3000:]
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["latest", f"step_{steps:06d}"]

    ref_yaml = _config(tmp_path, "ref", strategy, steps, [f"checkpoint.every={s}"])
    check_equals_resized_run(tmp_path, ref_yaml, _run, strategy, steps, s, 2, 1, TOL, run_until)
