"""The rendezvous store: torch-store semantics, and strangers rejected while a job runs."""

from __future__ import annotations

import hashlib
import hmac
import os
import pickle
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

from launcher.channel import HELLO, SALT, stretch
from launcher.store import MAGIC, NONCE, StoreAuthError, StoreClient, StoreServer, StoreTimeout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "cases", "launcher_worker.py")


class _CreatesFile:
    """Unpickling this creates a file: the payload a pickle-based store would execute."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.timeout(30)
def test_store_operations_match_torch_semantics():
    with StoreServer("s3cret") as server:
        c = StoreClient(server.address, "s3cret", timeout=5)
        c.set("a", b"1")
        assert c.get("a") == b"1"
        assert c.add("n", 2) == 2 and c.add("n", 3) == 5 and c.get("n") == b"5"
        assert c.check(["a", "n"]) and not c.check(["a", "missing"])
        assert c.compare_set("x", "", "v") == b"v"  # missing key + empty expected: set
        assert c.compare_set("x", "no", "w") == b"v"  # mismatch: current value
        assert c.compare_set("x", "v", "w") == b"w"
        assert c.compare_set("y", "e", "d") == b"e"  # missing key, non-empty expected: expected back
        threading.Timer(0.2, lambda: StoreClient(server.address, "s3cret").set("late", "L")).start()
        assert c.get("late", 10) == b"L"  # blocking get
        with pytest.raises(StoreTimeout, match="'never'"):
            c.get("never", 0.2)
        with pytest.raises(StoreTimeout):
            c.wait(["never"], 0.2)
        assert c.num_keys() == 4 and c.delete_key("a") and not c.delete_key("a")
        c.close()


def _handshake_reply(sock: socket.socket, secret: bytes, job: str) -> bytes:
    """A client's valid reply to the server's hello, written out by hand (protocol 3: the job id is bound)."""
    hello = sock.recv(HELLO, socket.MSG_WAITALL)
    salt, nonce_s, nonce_c = hello[len(MAGIC) : len(MAGIC) + SALT], hello[len(MAGIC) + SALT :], os.urandom(NONCE)
    j = bytes([len(job)]) + job.encode()
    return j + nonce_c + hmac.new(stretch(secret, salt), b"dt-client" + j + nonce_s + nonce_c, hashlib.sha256).digest()


def _closed_without_answer(sock: socket.socket) -> bool:
    """True when the server closes the connection without proving itself or answering."""
    sock.settimeout(10)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
            if len(data) >= 32:  # a server proof or a reply: it let us in
                return False
    except ConnectionResetError:
        return True


@pytest.mark.timeout(90)
def test_strangers_are_rejected_while_a_job_runs_and_the_job_finishes(tmp_path):
    secret = "7d1c9a0e5b3f48c2a6e1d09b7f3c5a8e2b4d6f1a9c0e7b3d5f2a8c6e1b4d9f07"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DISTTRAIN_JOB_SECRET": secret}
    job = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "launcher.cli",
            "--nproc-per-node",
            "2",
            "--rdzv-endpoint",
            f"127.0.0.1:{port}",
            "--run-id",
            "store-attack",
            WORKER,
            "store",
        ],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_CreatesFile(str(marker)))
    try:
        addr = ("127.0.0.1", port)
        deadline = time.monotonic() + 30
        while True:  # the launcher is up
            try:
                socket.create_connection(addr, 1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "launcher never opened its store"
                time.sleep(0.05)
        # 1. garbage bytes instead of a handshake
        with socket.create_connection(addr, 5) as g:
            g.recv(HELLO, socket.MSG_WAITALL)  # the server's challenge
            g.sendall(b"\x00\xffGET / HTTP/1.1\r\n\r\n" * 8)
            assert _closed_without_answer(g)
        # 2. a wrong secret
        with pytest.raises(StoreAuthError):
            StoreClient(f"127.0.0.1:{port}", "wrong-secret", connect_timeout=5)
        # 3. a recorded, valid handshake replayed on a new connection
        with socket.create_connection(addr, 5) as legit:
            recorded = _handshake_reply(legit, secret.encode(), "store-attack")
            legit.sendall(recorded)
            assert len(legit.recv(32, socket.MSG_WAITALL)) == 32  # accepted the first time
        with socket.create_connection(addr, 5) as replay:
            replay.recv(HELLO, socket.MSG_WAITALL)
            replay.sendall(recorded)
            assert _closed_without_answer(replay)
        # 4. a pickled payload (as a pickle-based store would accept), raw and as a frame
        with socket.create_connection(addr, 5) as p:
            p.recv(HELLO, socket.MSG_WAITALL)
            p.sendall(payload)
            assert _closed_without_answer(p)
        with socket.create_connection(addr, 5) as p:
            p.recv(HELLO, socket.MSG_WAITALL)
            p.sendall(len(payload).to_bytes(4, "big") + payload + b"\x00" * 64)
            assert _closed_without_answer(p)
        # ...and even an authenticated client's pickle is only ever stored as bytes.
        ok = StoreClient(f"127.0.0.1:{port}", secret, prefix="worker/attempt_0/", job="store-attack")
        ok.set("blob", payload)
        assert ok.get("blob") == payload
        ok.set("go", "1")  # let the workers finish
        out, err = job.communicate(timeout=60)
    finally:
        job.kill()
        job.wait()
    assert job.returncode == 0, err
    assert "count after me: 2" in out  # both workers used the store after the attacks
    rejected = re.findall(r"rejected connection from 127\.0\.0\.1:\d+: (.*)", err)
    assert len(rejected) >= 5, err  # garbage, wrong secret, replay, two pickles
    assert secret not in out + err
    assert not marker.exists()
