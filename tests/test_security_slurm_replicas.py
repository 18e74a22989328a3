"""Attacks on the replica stores of SLURM's agent mode (``launcher.slurm.agent``, ``launcher.replica_store``).

``srun -N2`` starts one agent per node (tests/support/slurm_cluster.py: two slurmd nodes on this host);
each runs a replica store under a secret derived from the job secret and the job id, and the workers
copy their state into both (``fault_tolerance.every=1``). While the job runs, every TCP port the two
agents listen on is attacked:

- by another local user (``tests/support/users``, with our own client code): a handshake under a key of
  their own claiming the job's id (which is no secret) and then a write of a copy's key; raw bytes that
  are no handshake, a 4 GiB frame length, and 300 connections held open at once (past the cap of 256
  handshakes in flight); every one is refused or dropped, and the stranger cannot list, read or plant
  in the agents' private directories of host-local copies;
- by a client that holds the job secret but not the replica stores' key (a client of the rendezvous
  store), and by one that holds the derived key for another job id: refused. The derived key for this
  job's id is accepted (so the ports attacked are the stores').

The job goes on untouched: every step is taken, both agents log the rejections with the peer's
address, the job exits 0 and its final checkpoint is written.
"""

from __future__ import annotations

import glob
import os
import re
import sys

import pytest

from launcher.replica_store import BASE_ENV, SHM_ENV, replica_secret
from launcher.slurm.secret import read_secret_file
from launcher.store import StoreClient, StoreError
from tests.support.listeners import listening
from tests.support.slurm_cluster import Step
from tests.support.users import intruder, run_as
from tests.test_fault_replicas import _config
from tests.test_slurm_host_loss import _environ, _node_processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 600
STRANGER = """
import os, secrets, socket, sys, time
from launcher.slurm.secret import read_secret_file
from launcher.store import StoreClient, StoreError
job = sys.argv[1]
for a in sys.argv[2:]:
    host, _, port = a.rpartition(":")
    try:
        StoreClient(a, secrets.token_hex(32), timeout=3, connect_timeout=3, job=job).set("c/0/1/d/0", b"x")
        print("ACCEPTED", a)
    except StoreError as exc:
        print("refused", a)
    for payload in (os.urandom(4096), (4 << 30).to_bytes(8, "big") * 16):
        with socket.create_connection((host, int(port)), 3) as s:
            s.settimeout(10)
            try:
                s.sendall(payload)
                while s.recv(65536):
                    pass
                print("dropped", a)
            except OSError:
                print("dropped", a)
    held = []
    for _ in range(300):
        try:
            held.append(socket.create_connection((host, int(port)), 3))
        except OSError:
            break
    time.sleep(1)
    for s in held:
        s.close()
    print("held", len(held), a)
"""


@pytest.mark.timeout(240)
def test_a_stranger_cannot_reach_slurm_agents_replica_stores(slurm_cluster, tmp_path):
    user = intruder()
    run_yaml = _config(tmp_path, "run", "ddp", STEPS, ["checkpoint.every=0", "fault_tolerance.every=1"])
    argv = ["srun", "-N2", "--ntasks-per-node=1", sys.executable, "-u", "-m", "launcher.slurm.agent"]
    argv += ["--nproc-per-node", "1", "--secret-dir", str(tmp_path), "-m", "disttrain.worker", run_yaml]
    # agents make their private directories in this test's own base (tests/conftest.py)
    env = dict(slurm_cluster.env, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, **{BASE_ENV: os.environ[BASE_ENV]})
    step = Step(argv, env)
    try:
        step.wait_for(r"\] step 5/", 120)
        agents, shm_dirs = [], []
        for node in ("0", "1"):
            pids = _node_processes(run_yaml, node)
            agents += [p for p in pids if "launcher.slurm.agent" in open(f"/proc/{p}/cmdline").read()]
            shm_dirs += [_environ(p)[SHM_ENV] for p in pids if SHM_ENV in _environ(p)]  # the workers' env
        assert len(agents) == 2 and len(set(shm_dirs)) == 2, (agents, shm_dirs)
        ports = sorted({addr for pid in agents for proto, addr, _ in listening({pid}) if proto.startswith("tcp")})
        (secret_file,) = [f for f in glob.glob(str(tmp_path / ".slurm-secret-*")) if not f.endswith(".tmp")]
        secret = read_secret_file(secret_file)
        job = "slurm-" + os.path.basename(secret_file).removeprefix(".slurm-secret-")
        job = re.sub(r"\.(\d+)$", r".r\1", job)  # .slurm-secret-JOB.STEP.RESTART -> slurm-JOB.STEP.rRESTART

        stranger = run_as(user, ["env", f"PYTHONPATH={ROOT}", "/usr/bin/python3", "-c", STRANGER, job, *ports])
        assert stranger.returncode == 0 and "ACCEPTED" not in stranger.stdout, stranger.stdout + stranger.stderr
        for a in ports:
            assert f"refused {a}" in stranger.stdout and stranger.stdout.count(f"dropped {a}") == 2, stranger.stdout
        for d in shm_dirs:
            for what, cmd in {"list": ["ls", d], "plant": ["sh", "-c", f"echo x > {d}/planted"]}.items():
                res = run_as(user, cmd, timeout=30)
                assert res.returncode != 0 and "denied" in res.stderr, (what, res.stdout, res.stderr)

        accepted = []
        for a in ports:
            for key, claim, why in [
                (secret, job, "the job secret itself"),
                (replica_secret(secret, job + "x"), job + "x", "another job's derived key"),
                (replica_secret(secret, job), job, None),
            ]:
                try:
                    StoreClient(a, key, timeout=5, connect_timeout=5, job=claim).close()
                    accepted.append((a, why))
                except StoreError:
                    pass
        replica_ports = [a for a, why in accepted if why is None]
        assert len(replica_ports) == 2, accepted  # one replica store per agent, reached with the derived key
        assert all(why in (None, "the job secret itself") for _, why in accepted), accepted
        # the one port the job secret opens is node 0's rendezvous store, never a replica store
        assert not {a for a, why in accepted if why} & set(replica_ports), accepted
        assert step.proc.poll() is None, "the job ended before the attacks did: " + step.text()[-3000:]
        code = step.proc.wait(180)
    finally:
        step.stop()
    out = step.text()
    assert code == 0, out[-4000:]
    assert f"done: {STEPS} steps on 2 ranks" in out, out[-4000:]
    assert re.search(r"peer replicas: [1-9]\d* copies .*, 0 failed", out), out[-4000:]
    assert out.count("rejected connection from 127.0.0.1") >= 2 * len(ports), out[-4000:]
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["latest", f"step_{STEPS:06d}"]
    assert not any(os.path.exists(d) for d in shm_dirs)  # the agents removed their directories
