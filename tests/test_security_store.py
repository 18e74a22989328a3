"""Attacks on the rendezvous store: injected and replayed frames, short secrets, a flood of slow
strangers while the worker group restarts, and the secret left in a worker's environment."""

from __future__ import annotations

import os
import re
import resource
import socket
import subprocess
import sys
import threading
import time

import pytest

from launcher import cli
from launcher.channel import MIN_SECRET, StoreError, check_secret, derive_job_id, pack
from launcher.store import SET, StoreClient, StoreServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "cases", "security_worker.py")
SECRET = "7d1c9a0e5b3f48c2a6e1d09b7f3c5a8e2b4d6f1a9c0e7b3d5f2a8c6e1b4d9f07"


class _Proxy:
    """A man in the middle: forwards one client connection to the server, records what the
    client sent, and can write extra bytes into the client-to-server direction."""

    def __init__(self, target: tuple[str, int]):
        self._listen = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listen.getsockname()[1]}"
        self.sent = bytearray()  # client -> server, as forwarded
        self._target, self._up = target, None
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        down, _ = self._listen.accept()
        self._up = socket.create_connection(self._target)

        def pump(src, dst, record):
            try:
                while data := src.recv(65536):
                    if record is not None:
                        record += data
                    dst.sendall(data)
            except OSError:
                pass
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        threading.Thread(target=pump, args=(down, self._up, self.sent), daemon=True).start()
        threading.Thread(target=pump, args=(self._up, down, None), daemon=True).start()

    def inject(self, data: bytes) -> None:
        self._up.sendall(data)


def _rejections(server: StoreServer, what: str, timeout: float = 10.0) -> list[tuple[str, str]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hits = [r for r in list(server.rejected) if what in r[1]]
        if hits:
            return hits
        time.sleep(0.02)
    return []


@pytest.mark.timeout(60)
def test_a_replayed_frame_after_a_good_handshake_is_refused_and_the_connection_closed():
    with StoreServer(SECRET) as server:
        host, _, port = server.address.rpartition(":")
        proxy = _Proxy((host, int(port)))
        client = StoreClient(proxy.address, SECRET, timeout=5)
        before = len(proxy.sent)
        assert client.add("n", 1) == 1
        deadline = time.monotonic() + 5
        while len(proxy.sent) == before and time.monotonic() < deadline:
            time.sleep(0.01)
        frame = bytes(proxy.sent[before:])  # the client's ADD, MAC and all
        proxy.inject(frame)  # replayed: valid MAC, old sequence number
        assert _rejections(server, "failed its MAC"), list(server.rejected)
        assert server.get_local("n") == b"1"  # the replay added nothing
        with pytest.raises(StoreError, match="dropped the connection"):
            client.add("n", 1)  # the server closed the tampered connection
        assert server.get_local("n") == b"1"
        # A fresh connection works (the store itself is unharmed).
        assert StoreClient(server.address, SECRET, timeout=5).add("n", 1) == 2


@pytest.mark.timeout(60)
def test_a_forged_frame_after_a_good_handshake_is_refused():
    with StoreServer(SECRET) as server:
        host, _, port = server.address.rpartition(":")
        proxy = _Proxy((host, int(port)))
        client = StoreClient(proxy.address, SECRET, timeout=5)
        client.set("victim", "good")
        forged = pack(SET, [b"victim", b"evil"]) + os.urandom(32)  # well formed, wrong MAC
        proxy.inject(forged)
        assert _rejections(server, "failed its MAC"), list(server.rejected)
        assert server.get_local("victim") == b"good"
        # A frame lifted from another connection (another session key) is refused too.
        other = _Proxy((host, int(port)))
        c2 = StoreClient(other.address, SECRET, timeout=5)
        mark = len(other.sent)
        c2.add("m", 5)
        lifted = bytes(other.sent[mark:])
        third = _Proxy((host, int(port)))
        c3 = StoreClient(third.address, SECRET, timeout=5)  # kept alive: its connection carries the lifted frame
        c3.ping()
        n_rejected = len(_rejections(server, "failed its MAC"))
        third.inject(lifted)
        deadline = time.monotonic() + 10
        while len(_rejections(server, "failed its MAC")) == n_rejected and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(_rejections(server, "failed its MAC")) > n_rejected
        assert server.get_local("m") == b"5"


@pytest.mark.unit
def test_short_user_secrets_are_refused(monkeypatch, capsys):
    with pytest.raises(StoreError, match=f"at least {MIN_SECRET}"):
        check_secret("x" * (MIN_SECRET - 1), "a test")
    for weak in ("x" * MIN_SECRET, "0123456789abcdef" * 4, "correct-horse" * 4):  # long, but guessable
        with pytest.raises(StoreError, match="is guessable"):
            check_secret(weak, "a test")
    assert check_secret(SECRET, "a test") == SECRET
    monkeypatch.setenv("DISTTRAIN_JOB_SECRET", "hunter2")
    assert cli.main(["--nproc-per-node", "1", WORKER, "sleep"]) == 2
    err = capsys.readouterr().err
    assert "DISTTRAIN_JOB_SECRET is 7 bytes" in err and "hunter2" not in err


def _fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


@pytest.mark.timeout(180)
def test_a_thousand_slow_strangers_while_the_group_restarts_and_the_job_finishes():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2200:
        pytest.skip(f"needs 2,200 file descriptors, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2200), hard))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DISTTRAIN_JOB_SECRET": SECRET}
    job = subprocess.Popen(
        [sys.executable, "-m", "launcher.cli", "--nproc-per-node", "2", "--max-restarts", "1"]
        + ["--rdzv-endpoint", f"127.0.0.1:{port}", WORKER, "restart"],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    stop, opened, peak_fds = threading.Event(), [0], [0]

    def flood():
        """Keep up to 1,000 connections open that trickle one byte a second and never finish."""
        socks: list[socket.socket] = []
        while not stop.is_set():
            while len(socks) < 1000 and not stop.is_set():
                try:
                    socks.append(socket.create_connection(("127.0.0.1", port), timeout=1))
                    opened[0] += 1
                except OSError:
                    break
                if opened[0] % 100 == 0:
                    peak_fds[0] = max(peak_fds[0], _fds(job.pid))
                    time.sleep(0.05)  # about 2,000 a second at most: a flood, not a CPU hog
            alive = []
            for c in socks:
                try:
                    c.send(b"\x00")
                    alive.append(c)
                except OSError:
                    c.close()
            socks = alive
            peak_fds[0] = max(peak_fds[0], _fds(job.pid))
            stop.wait(0.5)
        for c in socks:
            c.close()

    try:
        deadline = time.monotonic() + 30
        while True:  # the launcher's store is up
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "launcher never opened its store"
                time.sleep(0.05)
        flooder = threading.Thread(target=flood, daemon=True)
        flooder.start()
        deadline = time.monotonic() + 60
        while opened[0] < 1000 and time.monotonic() < deadline:
            time.sleep(0.05)
        # With the strangers in, the test (a legitimate client, admitted despite them) lets rank 1
        # die, and the group restarts under the flood.
        job_id = derive_job_id(f"127.0.0.1:{port}", SECRET)  # the job id of a start with --rdzv-endpoint
        StoreClient(f"127.0.0.1:{port}", SECRET, timeout=30, connect_timeout=30, job=job_id).set(
            "worker/attempt_0/go", "1"
        )
        out, err = job.communicate(timeout=150)
    finally:
        stop.set()
        job.kill()
        job.wait()
    assert job.returncode == 0, out + err
    assert "restarting worker group (restart 1 of 1)" in err, err
    met = re.findall(r"MET count=(\d+) secret_in_env=(\w+) secret_in_child=(\w+)", out)
    assert len(met) == 2 and all(m == ("2", "False", "False") for m in met), out
    assert opened[0] >= 1000, opened
    assert re.search(r"rejected connection from 127\.0\.0\.1:\d+|more connections rejected", err), err[-2000:]
    assert peak_fds[0] < 700, f"the launcher held {peak_fds[0]} descriptors: strangers were not capped"
    assert SECRET not in out + err


_TINY_STORE = """
import logging, resource, sys, time
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
resource.setrlimit(resource.RLIMIT_NOFILE, (48, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
from launcher.store import StoreServer
server = StoreServer(sys.argv[1]).start()
print(server.address, flush=True)
sys.stdin.read()
server.close()
"""


@pytest.mark.timeout(90)
def test_the_accept_loop_survives_running_out_of_file_descriptors():
    """A store limited to 48 descriptors, flooded by 150 idle strangers, still admits the job."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _TINY_STORE, SECRET],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    strangers = []
    try:
        address = proc.stdout.readline().strip()
        host, _, port = address.rpartition(":")
        for _ in range(150):
            strangers.append(socket.create_connection((host, int(port)), timeout=5))
        time.sleep(0.5)  # the server is out of descriptors now, shedding the oldest strangers
        client = StoreClient(address, SECRET, timeout=10, connect_timeout=30)
        client.set("k", "v")
        assert client.get("k") == b"v"
        for s in strangers:
            s.close()
        assert StoreClient(address, SECRET, timeout=10, connect_timeout=30).get("k") == b"v"
        proc.stdin.close()
        err = proc.stderr.read()
        assert proc.wait(20) == 0, err
    finally:
        for s in strangers:
            s.close()
        proc.kill()
    assert "accept failed (Too many open files)" in err, err[-2000:]


@pytest.mark.timeout(60)
def test_a_stranger_trickling_bytes_is_dropped_by_one_deadline_for_the_whole_handshake():
    """One byte every 0.3 s would keep a per-read timeout happy for ever; the handshake as a
    whole has one deadline, so the server hangs up long before the 64-byte reply is complete."""
    with StoreServer(SECRET) as server:
        host, _, port = server.address.rpartition(":")
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.recv(40, socket.MSG_WAITALL)  # the server's hello
            sent = 0
            try:
                while sent < 63:
                    s.sendall(b"\x00")
                    sent += 1
                    time.sleep(0.3)
                    s.settimeout(0.01)
                    try:
                        if s.recv(1) == b"":
                            break  # closed by the server
                    except TimeoutError:
                        pass
                    finally:
                        s.settimeout(5)
            except (BrokenPipeError, ConnectionResetError):
                pass
        assert sent < 63, "the server waited for the whole trickle"
        assert _rejections(server, "no handshake within")


_NO_THREADS_STORE = """
import logging, sys, threading
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
from launcher.store import StoreServer
server = StoreServer(sys.argv[1]).start()
print(server.address, flush=True)
threading.stack_size(1 << 44)  # from now on no thread can start: pthread_create fails
sys.stdin.readline()
threading.stack_size(0)
print("restored", flush=True)
sys.stdin.read()
server.close()
"""


@pytest.mark.timeout(60)
def test_the_accept_loop_survives_failing_to_start_a_thread():
    proc = subprocess.Popen(
        [sys.executable, "-c", _NO_THREADS_STORE, SECRET],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        address = proc.stdout.readline().strip()
        first = StoreClient(address, SECRET, timeout=10, connect_timeout=30)  # proven, but no thread to serve it
        with pytest.raises(StoreError, match="dropped the connection"):
            first.ping()
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "restored"
        second = StoreClient(address, SECRET, timeout=10, connect_timeout=30)
        second.set("k", "v")
        assert second.get("k") == b"v"
        proc.stdin.close()
        err = proc.stderr.read()
        assert proc.wait(20) == 0, err
    finally:
        proc.kill()
    assert "could not serve 127.0.0.1" in err and "can't start new thread" in err, err
