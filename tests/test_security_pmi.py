"""Attacks on the PMI server that rank 0 of an ``mpi`` job runs (collectives/backends/mpi/pmi.py):
a stranger on its port during MPI start-up and mid-run, id guessing, connection drops,
overwriting keys, and the ``../`` unlink attack. The job finishes with exit 0 and the same
result; nothing outside MPICH's own segments is ever unlinked."""

from __future__ import annotations

import json
import os
import pwd
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

from collectives.backends.mpi import pmi

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASE = os.path.join(ROOT, "tests", "cases", "security_mpi.py")


def _send(port: int, data: bytes, *, read: bool = True) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        if not read:
            return b""
        s.settimeout(5)
        out = b""
        try:
            while chunk := s.recv(4096):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return out


def _rank_line(f) -> dict:
    return dict(kv.split("=", 1) for kv in f.readline().decode().split() if "=" in kv)


@pytest.mark.timeout(60)
def test_pmi_server_admits_only_its_ids_once_keeps_keys_and_unlinks_only_its_segments(tmp_path):
    proc, port, ids, token = pmi.spawn(2, "127.0.0.1", "(vector,(0,1,2))", stderr=subprocess.PIPE)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    planted = {}
    try:
        # Strangers: guesses, garbage, an endless line, the ../ report without and with a guessed token.
        for guess in (0, 1, 2, 12345):
            if guess not in ids:
                assert b"rank=" not in _send(port, f"cmd=initack pmiid={guess}\n".encode())
        assert _send(port, b"cmd=barrier_in\n") == b""
        assert _send(port, b"x" * 100_000) == b""
        climb = f"/dev/shm/mpich_shm_/../..{victim}"
        assert _send(port, f"cmd=collectives_segments paths={climb}\n".encode()) == b""  # no token, no ack
        assert _send(port, f"cmd=collectives_segments token={'0' * 64} paths={climb}\n".encode()) == b""
        # Segment-shaped names that are not ours to delete: another user's file, a symlink, a directory.
        nobody = pwd.getpwnam("nobody").pw_uid
        for kind in ("foreign", "link", "dir"):
            name = f"mpich_shm_{os.urandom(4).hex()}_{len(planted)}"
            path = f"/dev/shm/{name}"
            if kind == "foreign":
                open(path, "w").close()
                os.chown(path, nobody, nobody)
            elif kind == "link":
                os.symlink(victim, path)
            else:
                os.mkdir(path)
            planted[kind] = path
        ours = f"/dev/shm/mpich_shm_{os.urandom(4).hex()}_7"
        open(ours, "w").close()
        reported = [*planted.values(), ours, climb, "/tmp/mpich_shm_ab_1"]
        # The ranks: each id once, a second use of an id is a stranger.
        conns = []
        for rank, pmi_id in enumerate(ids):
            c = socket.create_connection(("127.0.0.1", port), timeout=10)
            f = c.makefile("rwb")
            f.write(f"cmd=initack pmiid={pmi_id}\n".encode())
            f.flush()
            got = [_rank_line(f) for _ in range(4)]
            assert got[2] == {"cmd": "set", "rank": str(rank)}
            conns.append((c, f))
        assert b"rank=" not in _send(port, f"cmd=initack pmiid={ids[0]}\n".encode())
        f0, f1 = conns[0][1], conns[1][1]
        f0.write(b"cmd=put kvsname=k key=card0 value=good\n")
        f0.flush()
        assert _rank_line(f0)["rc"] == "0"
        f1.write(b"cmd=put kvsname=k key=card0 value=evil\n")
        f1.flush()
        assert _rank_line(f1)["rc"] == "-1"  # write-once
        f1.write(b"cmd=get kvsname=k key=card0\n")
        f1.flush()
        assert _rank_line(f1)["value"] == "good"
        # Strangers dropping connections mid-run do not fail a barrier.
        for _ in range(5):
            socket.create_connection(("127.0.0.1", port)).close()
        for f in (f0, f1):
            f.write(b"cmd=barrier_in\n")
            f.flush()
        assert [_rank_line(f)["rc"] for f in (f0, f1)] == ["0", "0"]
        # Our own report, with the token: only the genuine segment-shaped paths are candidates.
        assert b"collectives_segments_ack rc=0" in _send(port, pmi.segments_line(token, reported))
        for f in (f0, f1):
            f.write(b"cmd=finalize\n")
            f.flush()
            assert _rank_line(f)["cmd"] == "finalize_ack"
        for c, f in conns:
            f.close()
            c.close()
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0
        assert victim.read_text() == "precious"
        assert all(os.path.lexists(p) for p in planted.values()), planted
        assert not os.path.exists(ours)  # ours, reported with the token: cleaned up
        assert err.count(b"rejected connection") >= 8, err
        assert b"not unlinking /dev/shm/mpich_shm_" in err
    finally:
        proc.kill()
        for p in [*planted.values()]:
            if os.path.isdir(p) and not os.path.islink(p):
                os.rmdir(p)
            elif os.path.lexists(p):
                os.unlink(p)


def _pmi_port(launcher_pid: int) -> int | None:
    """The listening port of the PMI server under ``launcher_pid``, found the way a local
    stranger would (``ss -ltnp``): /proc, no help from the job."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"pmi.py" not in f.read():
                    continue
            inodes = {
                os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1]
                for fd in os.listdir(f"/proc/{pid}/fd")
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
            }
            with open(f"/proc/{pid}/net/tcp") as f:
                for line in list(f)[1:]:
                    cols = line.split()
                    if cols[3] == "0A" and cols[9] in inodes:
                        return int(cols[1].split(":")[1], 16)
        except OSError:
            continue
    return None


def _attack(port: int, victim: str, stop: threading.Event, counts: dict) -> None:
    climb = f"/dev/shm/mpich_shm_/../..{victim}"
    held = []
    while not stop.is_set():
        for payload in (
            None,  # connect and drop: what used to fail the job with exit 15
            b"cmd=barrier_in\n",
            b"cmd=abort\n",
            f"cmd=initack pmiid={counts['n'] % 4}\n".encode(),
            b"cmd=put kvsname=kvs key=P0-businesscard value=evil\n",
            f"cmd=collectives_segments paths={climb}\n".encode(),
            b"y" * 20_000,
        ):
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=2)
                if payload:
                    s.sendall(payload)
                if len(held) < 80 and counts["n"] % 3 == 0:
                    held.append(s)  # slow strangers that never finish a line
                else:
                    s.close()
                counts["n"] += 1
            except OSError:
                pass
        stop.wait(0.05)
    for s in held:
        s.close()


@pytest.mark.timeout(180)
def test_an_mpi_job_under_attack_on_its_pmi_port_finishes_with_the_same_result(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    steps, world, stop_file = 600, 3, tmp_path / "stop"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(
        [sys.executable, "-m", "launcher.cli", "--nproc-per-node", str(world), CASE, str(steps), str(stop_file)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stop, counts, found = threading.Event(), {"n": 0}, {}

    def find_and_attack():
        while not stop.is_set() and job.poll() is None:
            port = _pmi_port(job.pid)
            if port:
                found["at"] = counts["n"]
                _attack(port, str(victim), stop, counts)
                return
            time.sleep(0.005)

    def stop_after_some_blows():  # the ranks run until the stranger has tried everything a few times
        while counts["n"] < 60 and job.poll() is None:
            time.sleep(0.05)
        stop_file.touch()

    attacker = threading.Thread(target=find_and_attack, daemon=True)
    attacker.start()
    threading.Thread(target=stop_after_some_blows, daemon=True).start()
    try:
        out, err = job.communicate(timeout=150)
    finally:
        stop.set()
        job.kill()
        job.wait()
    attacker.join(10)
    assert job.returncode == 0, out + err
    assert "at" in found and counts["n"] >= 60, (found, counts)  # the stranger got in its blows
    results = [json.loads(m) for m in re.findall(r"RESULT (.*)", out)]
    n = len(results[0]["sums"])
    assert n < steps, "the job never saw the stop file"
    expected = [float(sum(r + 1 for r in range(world)) * (s + 1)) for s in range(n)]
    assert sorted(r["rank"] for r in results) == list(range(world))
    assert all(r["sums"] == expected for r in results), results
    assert victim.read_text() == "precious"
    assert "collectives PMI server: rejected connection" in err, err[-3000:]
