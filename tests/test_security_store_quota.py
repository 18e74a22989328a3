"""A proven but faulty client against the store (a server in its own process): a flood of keys,
values and APPENDs answered with errors while the store keeps serving, a reply too large for a
frame, GET racing DELETE, a cap on served connections, and keepalive on served sockets."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from launcher.store import StoreClient, StoreError, StoreTimeout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = "5c0e8a2f7b1d4e9a3c6f0b8d2e5a7c1f9b3d6e0a4c8f2b5d7e1a9c3f6b0d8e2a"

# Limits lowered so the test stays small; the code paths are the production ones.
_STORE = """
import logging, sys
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
from launcher import store
store.MAX_VALUE, store.MAX_TOTAL, store.MAX_KEYS, store.MAX_CONNECTIONS = 4 << 20, 48 << 20, 2000, 6
store.MAX_REPLY = 24 << 20
server = store.StoreServer(sys.argv[1]).start()
print(server.address, flush=True)
sys.stdin.read()
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across fork and exec, so a server started by a big
# parent (a long pytest run) would report the parent's size; VmHWM belongs to this image alone.
hwm = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print("PEAK_KB", hwm, "BYTES", server.nbytes, flush=True)
server.close()
"""


@pytest.fixture
def server():
    proc = subprocess.Popen(
        [sys.executable, "-c", _STORE, SECRET],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc, proc.stdout.readline().strip()
    finally:
        proc.kill()
        proc.wait(10)


def _finish(proc) -> tuple[str, str]:
    out, err = proc.communicate("", timeout=30)
    assert proc.returncode == 0, err[-2000:]
    return out, err


@pytest.mark.timeout(120)
def test_a_flood_of_keys_values_and_appends_is_refused_and_the_store_keeps_serving(server):
    proc, address = server
    c = StoreClient(address, SECRET, timeout=10, connect_timeout=30)
    with pytest.raises(StoreError, match="over the limit of 4194304"):
        c.set("big", b"x" * (5 << 20))
    chunk = b"a" * (1 << 20)
    appended = 0
    with pytest.raises(StoreError, match="passes the limit"):
        for _ in range(100):
            c.append("grow", chunk)
            appended += 1
    assert appended == 4 and len(c.get("grow")) == 4 << 20
    with pytest.raises(StoreError, match="would pass the limit"):
        for i in range(100):
            c.compare_set(f"blob{i}", "", b"b" * (3 << 20))
    with pytest.raises(StoreError, match="keys, the limit"):
        for i in range(5000):
            c.set(f"k{i}", "v")
    # A reply over the frame limit is refused, not sent (the client would drop the connection).
    with pytest.raises(StoreError, match="the reply would be"):
        c.multi_get(["grow"] * 8, timeout=5)
    # The same connection and a new one still work; deleting makes room again.
    assert c.get("k0") == b"v" and c.num_keys() == 2000
    other = StoreClient(address, SECRET, timeout=10, connect_timeout=30)
    assert other.delete_key("grow") and other.delete_key("blob0")
    other.set("k0", b"y" * (3 << 20))
    assert len(c.get("k0")) == 3 << 20
    out, err = _finish(proc)
    peak_kb = int(out.split("PEAK_KB")[1].split()[0])
    assert peak_kb < 400_000, f"server peak RSS {peak_kb} KiB"
    assert "refused" in err and "127.0.0.1" in err  # each refusal is logged with the peer


@pytest.mark.timeout(120)
def test_get_racing_delete_never_kills_the_serving_thread(server):
    proc, address = server
    reader = StoreClient(address, SECRET, timeout=10, connect_timeout=30)
    writer = StoreClient(address, SECRET, timeout=10, connect_timeout=30)
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            writer.set("flip", "1")
            writer.delete_key("flip")

    t = threading.Thread(target=churn, daemon=True)
    t.start()
    got = 0
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                reader.get("flip", timeout=0.05)
                got += 1
            except StoreTimeout:
                pass
    finally:
        stop.set()
        t.join(10)
    assert got > 0
    reader.ping()  # the reader's serving thread is alive
    _finish(proc)


@pytest.mark.timeout(120)
def test_served_connections_are_capped_and_kept_alive(server):
    proc, address = server
    port = address.rpartition(":")[2]
    clients = [StoreClient(address, SECRET, timeout=10, connect_timeout=30) for _ in range(6)]
    with pytest.raises(StoreError):
        StoreClient(address, SECRET, timeout=10, connect_timeout=5)
    clients.pop().close()
    deadline = time.monotonic() + 10
    while True:  # the freed slot is taken by the next client
        try:
            clients.append(StoreClient(address, SECRET, timeout=10, connect_timeout=5))
            break
        except StoreError:
            assert time.monotonic() < deadline, "a closed connection never freed its slot"
            time.sleep(0.1)
    for c in clients:
        c.ping()
    deadline = time.monotonic() + 10
    while True:  # the kernel shows a keepalive timer on an idle served socket
        ss = subprocess.run(["ss", "-tnoH", "state", "established", f"sport = :{port}"], capture_output=True, text=True)
        if ss.stdout.count("timer:(keepalive") >= len(clients) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert ss.stdout.count("timer:(keepalive") >= len(clients), ss.stdout
    out, err = _finish(proc)
    assert "6 connections are being served already" in err, err[-2000:]
