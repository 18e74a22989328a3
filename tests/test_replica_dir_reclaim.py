"""A SIGKILLed agent's private replica directory (copies in /dev/shm, i.e. RAM) is removed by the next
agent on the host, and nothing else is (``launcher.replica_dir``).

A real store in another process writes a 1 MiB segment into its directory and is SIGKILLed: the
directory outlives it. Beside it stand directories that must survive a reclaim: a live store's (in
this process), one of ours without an owner record, one whose record is a link, one whose record
names a dead pid but another boot, and one another user made with a forged record naming a dead
pid; and a link named like ours to a directory of ours with a dead record. A new store in the same
base removes only the killed agent's directory, says so in the log with the bytes freed, and every
other entry is still there, unchanged.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile

import pytest

from launcher.replica_dir import OWNER, PREFIX, owner_record
from launcher.replica_store import BASE_ENV, ReplicaStore, replica_secret
from tests.support.users import intruder, run_as, tree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB = "job-reclaim"
CHILD = """
import os, secrets, sys
from launcher.replica_store import ReplicaStore, replica_secret
s = ReplicaStore(replica_secret(secrets.token_hex(32), "job-reclaim"), "127.0.0.1", max_bytes=8 << 20, job="job-reclaim")
s.start()
with open(os.path.join(s.shm_dir, "r0-seg"), "wb") as f:
    f.write(os.urandom(1 << 20))
print(s.shm_dir, flush=True)
sys.stdin.read()  # held until SIGKILLed
"""


def _store() -> ReplicaStore:
    return ReplicaStore(replica_secret(secrets.token_hex(32), JOB), "127.0.0.1", max_bytes=1 << 20, job=JOB)


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _ours(base: str, name: str, record: dict | None, link_record: bool = False) -> str:
    d = os.path.join(base, PREFIX + name)
    os.mkdir(d, 0o700)
    with open(os.path.join(d, "seg"), "wb") as f:
        f.write(b"x" * 4096)
    if record is not None:
        target = os.path.join(base, name + ".rec") if link_record else os.path.join(d, OWNER)
        with open(target, "w") as f:
            json.dump(record, f)
        if link_record:
            os.symlink(target, os.path.join(d, OWNER))
    return d


@pytest.mark.timeout(120)
def test_next_agent_removes_only_a_sigkilled_agents_directory(monkeypatch, caplog):
    user = intruder()
    base = tempfile.mkdtemp(prefix="dt-reclaim-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None)
    os.chmod(base, 0o1777)  # sticky, like /dev/shm: the other user may make entries of their own
    monkeypatch.setenv(BASE_ENV, base)
    live = None
    try:
        live = _store().start()  # a live agent's directory
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD],
            cwd=ROOT,
            env={**os.environ, BASE_ENV: base},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        killed_dir = child.stdout.readline().strip()
        assert killed_dir.startswith(os.path.realpath(base)), killed_dir
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        assert sorted(os.listdir(killed_dir)) == [OWNER, "r0-seg"]  # SIGKILL left it, in RAM

        dead = {**owner_record(), "pid": _dead_pid(), "start": "1"}
        keep = {
            "no-record": _ours(base, "norecord", None),
            "record-is-a-link": _ours(base, "linkrec", dead, link_record=True),
            "other-boot": _ours(base, "otherboot", {**dead, "boot": "not-this-boot"}),
        }
        target = _ours(os.path.join(base), "linktarget", dead)
        os.rename(target, os.path.join(base, "not-ours-by-name"))
        os.symlink(os.path.join(base, "not-ours-by-name"), os.path.join(base, PREFIX + "alink"))
        theirs = os.path.join(base, PREFIX + "theirs")
        forged = json.dumps(dead).replace('"', '\\"')
        res = run_as(user, ["sh", "-c", f'mkdir -m 755 {theirs} && echo "{forged}" > {theirs}/{OWNER}'], timeout=30)
        assert res.returncode == 0, res.stderr
        before = tree(base)

        with caplog.at_level(logging.WARNING, logger="launcher.replica_dir"):
            nxt = _store().start()
        try:
            assert not os.path.lexists(killed_dir)
            freed = [r.getMessage() for r in caplog.records if killed_dir in r.getMessage()]
            assert freed and "died without removing it" in freed[0] and "bytes freed" in freed[0], freed
            after = tree(base)
            gone = {k for k in before if k not in after}
            assert gone == {k for k in before if k.startswith(os.path.basename(killed_dir))}
            assert all(after[k] == v for k, v in before.items() if k in after)  # the rest unchanged
            assert os.path.isdir(live.shm_dir) and os.path.isdir(nxt.shm_dir)
            for d in keep.values():
                assert "seg" in os.listdir(d), d
        finally:
            nxt.close()
    finally:
        if live is not None:
            live.close()
        subprocess.run(["rm", "-rf", "--one-file-system", base], check=False)
