"""Losing a host with peer replicas on (``fault_tolerance.every=1``): network namespaces as hosts,
each node started torchrun-style with ``--nnodes 1:2`` (tests/test_launcher_elastic.py's harness).

Under ddp, a third host that is not part of the job (no secret) attacks every port host 0 listens
on (the job store, the replica store) from step 5 on, while the loss below happens: every handshake
is refused, host 0's agent logs it with the attacker's address, and the job goes on.

A host SIGKILLed (agent and workers) under ddp and zero3: the survivor's new worker resumes from
the copies in the surviving agent's memory, with no disk checkpoint to read (``checkpoint.every=0``:
none exists before the end), at most one step lost, and ends where a run that changed to world size 1
at the same step from a disk checkpoint ends (same global batch). Under ddp no replicated byte
crosses to the other host: each host's agent holds its own rank's copy of the whole state, the other
host only the copy's header (what host 0 frees of rank 1's copies after the loss says so).
"""

from __future__ import annotations

import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from disttrain import config as config_mod
from tests.support.host_loss import lose_host_1
from tests.support.resized import check_equals_resized_run, run_until
from tests.support.resized import run_to_end as _run  # tests/test_fault_*.py import it from here
from tests.test_launcher_elastic import ROOT, _no_netns

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


@pytest.mark.timeout(300)
@pytest.mark.parametrize("strategy,every", [("ddp", "1"), ("zero3", "auto")])
def test_a_lost_host_resumes_from_peer_memory_and_equals_a_resized_run(tmp_path, strategy, every):
    steps = 120
    run_yaml = _config(tmp_path, "run", strategy, steps, ["checkpoint.every=0", f"fault_tolerance.every={every}"])
    attacker: list[str] = []

    def attack(hosts, node0):  # in the background: its Python starts slower than steps go by
        attacker.append(hosts.addrs[2])
        node0.wait_for(r"step 5/", 120)
        return ThreadPoolExecutor(1).submit(_attack_from_outside, hosts)

    ddp = strategy == "ddp"
    loss = lose_host_1(
        ["-m", "disttrain.worker", run_yaml], resumed=RESUMED, hosts=3 if ddp else 2, beside=attack if ddp else None
    )
    out, err = loss.out, loss.err
    assert loss.code == 0, loss.text
    m = re.search(RESUMED, out)
    s = int(m.group(1))
    done_before = max(int(x) for x in re.findall(r"\] step (\d+)/", out[: m.start()]))
    print(
        f"{strategy}: resumed from peer memory at step {s} ({done_before - s} step(s) lost), {loss.resumed_after:.1f}s"
    )
    # every=auto measured and chose k (rank 0 says so): at most k steps are at risk
    k = int(re.search(r"every=auto: .* copies every (\d+) step", out).group(1)) if every == "auto" else 1
    assert done_before - s <= k, f"{done_before - s} steps lost, copies every {k}"
    assert "resumed from /" not in out, "a disk checkpoint was read"
    # world 1 after the loss: its copies went to its own agent through the shared segment, none on a socket
    # the copies of rank 1 (world 2) are freed once world 1 has a complete copy; the holder says how many bytes
    freed = re.search(r"freed (\d+) bytes of copies of ranks 1\.\.1 \(world 2 -> 1\) at step (\d+)", out)
    assert freed and int(freed.group(1)) > 0 and int(freed.group(2)) > s, out
    read = int(re.search(r"resumed from peer memory at step \d+ \((\d+) bytes\)", out).group(1))
    if ddp:  # every box is on both hosts: rank 1 sent host 0 only its copies' headers and records
        # (disttrain.fault.plan; it held two, which took a whole state's bytes before), and host 0's own
        # copy held the whole state, which the survivor read back
        assert int(freed.group(1)) < read / 2, (freed.group(0), read)
    assert re.search(r"peer replicas: [1-9]\d* copies \(0\.0 MiB sent by rank 0\), \d+ waited .*, 0 failed", out), out
    assert re.search(r"round 1: .*lost \S+; world 2 -> 1", err), loss.text
    if ddp:  # the attack was refused and logged with its address; the job went on
        assert f"rejected connection from {attacker[0]}" in err, err[-3000:]
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["latest", f"step_{steps:06d}"]

    ref_yaml = _config(tmp_path, "ref", strategy, steps, [f"checkpoint.every={s}"])
    check_equals_resized_run(tmp_path, ref_yaml, _run, strategy, steps, s, 2, 1, TOL, run_until)
