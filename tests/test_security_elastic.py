"""The elastic driver's doors (``disttrain launch --min-np/--max-np --host-discovery-script``).

One job (two idle workers, tests/cases/elastic_idle.py; the doors are the driver's) is attacked
while it runs, and must keep its world through all of it:

- its store: a client without the secret and a client of another job that holds the secret are
  refused, and the driver logs both;
- its discovery script's output: a host name with shell metacharacters (``;touch PWNED``, never
  run: no shell), an option-looking name (``-oProxyCommand=...``), bytes that are not text, and
  a script that hangs past ``--discovery-timeout`` (its ``sleep`` child is killed with it): each
  a clear error naming the script, and the workers keep running in the same world;
- then a real change (a host removed) makes world 1, and the next one (a host added) would pass
  ``--reset-limit 1``: the job stops with exit 1 saying so.

Unit: the script's program must be a regular file no other user may write (refused before the
job starts), and a hung script's process group is killed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from launcher.channel import StoreAuthError
from launcher.discovery import DiscoveryError, HostDiscovery
from launcher.store import StoreClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "cases", "elastic_idle.py")
SECRET = "9a3c5e7f1b2d4f6a8c0e2b4d6f8a1c3e5a7c9e1b3d5f7a9c2e4b6d8f0a1c3e5b"
JOB = "elastic-doors"


def _script(tmp_path, hosts_file) -> str:
    """Prints the hosts file; while ``hang`` exists it hangs (a child sleeps, its pid written)."""
    script = tmp_path / "hosts.sh"
    script.write_text(
        f"#!/bin/sh\nif [ -e {tmp_path}/hang ]; then sleep 30 & echo $! > {tmp_path}/sleep.pid; wait; fi\n"
        f"cat {hosts_file}\n"
    )
    script.chmod(0o700)
    return str(script)


def _set(path, data: bytes) -> None:
    path.with_suffix(".new").write_bytes(data)
    os.replace(path.with_suffix(".new"), path)  # the script never reads half a file


def _wait_for(test, what: str, proc, out, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = test()
        if got:
            return got
        if proc.poll() is not None:
            pytest.fail(f"the job ended while waiting for {what}:\n{out.read_text()}")
        time.sleep(0.05)
    pytest.fail(f"no {what} within {timeout:g}s:\n{out.read_text()}")


def _alive(pid: int) -> bool:
    """Running (a zombie not yet reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False


@pytest.mark.timeout(120)
def test_the_elastic_drivers_doors_hold_and_the_world_stays(tmp_path):
    hosts = tmp_path / "hosts.txt"
    _set(hosts, b"127.0.0.1:1\n127.0.0.2:1\n")
    out = tmp_path / "driver.log"
    argv = [sys.executable, "-m", "launcher.cli", "--run-id", JOB, "--min-np", "1", "--max-np", "3"]
    argv += ["--host-discovery-script", _script(tmp_path, hosts), "--discovery-interval", "0.2"]
    argv += ["--discovery-timeout", "1", "--reset-limit", "1", WORKER, str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": ROOT, "DISTTRAIN_JOB_SECRET": SECRET}
    with open(out, "w") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        rows = _wait_for(
            lambda: (
                [json.loads(p.read_text()) for p in sorted(tmp_path.glob("worker*.json"))][:2]
                if len(list(tmp_path.glob("worker*.json"))) == 2
                else None
            ),
            "two workers",
            proc,
            out,
        )
        pids, store = {r["pid"] for r in rows}, rows[0]["store"]

        # the store: no secret, then the secret but another job's id
        with pytest.raises(StoreAuthError):
            StoreClient(store, "0" * 64, timeout=5, connect_timeout=5, job=JOB)
        with pytest.raises(StoreAuthError, match="claims job 'job-b'"):
            StoreClient(store, SECRET, timeout=5, connect_timeout=5, job="job-b")
        _wait_for(
            lambda: out.read_text().count("rendezvous store: rejected connection") >= 2, "two refusals", proc, out
        )
        assert "this store serves job 'elastic-doors'" in out.read_text()

        # the script's output: each bad answer is an error, and the world stays
        pwned = tmp_path / "PWNED"
        bad = [
            (f"127.0.0.1:1\n127.0.0.2;touch {pwned}:1\n".encode(), "is not a host name"),
            (f"127.0.0.1:1\n-oProxyCommand=touch {pwned}\n".encode(), "'-oProxyCommand=touch"),
            (b"127.0.0.1:1\n\xff\xfe\x00garbage\n", "not UTF-8"),
        ]
        for data, why in bad:
            _set(hosts, data)
            _wait_for(lambda why=why: why in out.read_text(), f"the error {why!r}", proc, out)
        (tmp_path / "hang").touch()
        _wait_for(lambda: "did not finish within 1s" in out.read_text(), "the hang's timeout", proc, out)
        sleeper = int((tmp_path / "sleep.pid").read_text())
        _wait_for(lambda: not _alive(sleeper), "the hung script's child killed", proc, out, 5)
        (tmp_path / "hang").unlink()
        text = out.read_text()
        assert not pwned.exists()
        assert text.count("keeping the hosts found before") >= 4, text
        assert "elastic: round" not in text, text  # no transition yet
        assert all(_alive(p) for p in pids) and len(list(tmp_path.glob("worker*.json"))) == 2, text

        # the job goes on: a real change makes world 1; the one after would pass --reset-limit 1
        _set(hosts, b"127.0.0.1:1\n")
        _wait_for(lambda: "removed 127.0.0.2" in out.read_text(), "world 1", proc, out)
        _set(hosts, b"127.0.0.1:1\n127.0.0.3:1\n")
        proc.wait(30)
        text = out.read_text()
        assert proc.returncode == 1, text
        assert "--reset-limit 1 reached: 1 new world(s) after the first" in text and "added 127.0.0.3" in text, text
        assert not any(_alive(p) for p in pids), "the driver left workers running"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- unit ---------------------------------------------------------------------------------------
@pytest.mark.unit
def test_a_discovery_script_another_user_may_write_is_refused(tmp_path):
    script = tmp_path / "hosts.sh"
    script.write_text("#!/bin/sh\necho localhost\n")
    for mode in (0o722, 0o757):
        script.chmod(mode)
        with pytest.raises(DiscoveryError, match=r"group or others may write it; refusing to run it\nHINT: chown"):
            HostDiscovery(f"{script} --flag")
    script.chmod(0o700)
    if os.geteuid() == 0:
        os.chown(script, 65534, 65534)  # nobody's file, even unwritable by others: not ours
        with pytest.raises(DiscoveryError, match="owned by uid 65534"):
            HostDiscovery(str(script))
        os.chown(script, 0, 0)
    assert HostDiscovery(str(script)).find() == {"localhost": 1}
    with pytest.raises(DiscoveryError, match="not a regular file"):
        HostDiscovery(str(tmp_path))
    with pytest.raises(DiscoveryError, match="not on PATH"):
        HostDiscovery("no-such-discovery-program-here")


@pytest.mark.unit
def test_a_hung_discovery_script_is_killed_with_its_children(tmp_path):
    script = tmp_path / "hang.sh"
    script.write_text(f"#!/bin/sh\nsleep 30 & echo $! > {tmp_path}/pid\nwait\n")
    script.chmod(0o700)
    t0 = time.monotonic()
    with pytest.raises(DiscoveryError, match="did not finish within 0.5s"):
        HostDiscovery(str(script), timeout=0.5).find()
    assert time.monotonic() - t0 < 10  # not held by the sleep's open output
    child = int((tmp_path / "pid").read_text())
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _alive(child)
