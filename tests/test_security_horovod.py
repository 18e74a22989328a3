"""Horovod's rendezvous server (an unauthenticated HTTP key-value store) under attack: it listens
on loopback for a one-host job, and another local user speaking HTTP to it gets no answer, reads
no peer address and overwrites nothing; the job finishes with the right result. The uid check
underneath is tested on its own with a real second user."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from collectives.backends.horovod_rendezvous import peer_uid
from tests.support.harness import spawn
from tests.support.users import intruder, run_as

_HTTP = """
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
out = []
for req in (b"GET /global/0 HTTP/1.0\\r\\n\\r\\n", b"PUT /global/0 HTTP/1.0\\r\\nContent-Length: 4\\r\\n\\r\\nevil",
            b"DELETE /global/0 HTTP/1.0\\r\\n\\r\\n"):
    try:
        s = socket.create_connection((host, port), timeout=5)
        s.sendall(req)
        s.settimeout(5)
        out.append(s.recv(200))
    except OSError as exc:
        out.append(repr(exc).encode())
print(out)
"""


@pytest.mark.unit
def test_peer_uid_tells_our_own_connections_from_another_users():
    other = intruder()
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    try:
        mine = socket.create_connection(("127.0.0.1", port))
        conn, _ = srv.accept()
        assert peer_uid(conn) == os.geteuid()
        conn.close()
        mine.close()
        t = threading.Thread(
            target=run_as,
            args=(
                other,
                [
                    "/usr/bin/python3",
                    "-c",
                    f"import socket,time; s=socket.create_connection(('127.0.0.1',{port})); time.sleep(3)",
                ],
            ),
            kwargs={"timeout": 30},
            daemon=True,
        )
        t.start()
        srv.settimeout(20)
        conn, _ = srv.accept()
        assert peer_uid(conn) == other.pw_uid
        conn.close()
        t.join(30)
    finally:
        srv.close()


@pytest.mark.timeout(200)
def test_a_stranger_speaking_http_to_horovods_rendezvous_gets_nothing(tmp_path):
    pytest.importorskip("horovod.torch", reason="Horovod is not installed (scripts/build_horovod.sh builds it)")
    other = intruder()
    from launcher.store import StoreServer, new_secret

    port_file, go_file = str(tmp_path / "port"), str(tmp_path / "go")
    result: dict = {}
    secret = new_secret()
    with StoreServer(secret, job="hvd-attacked") as server:
        env = {"DISTTRAIN_STORE": server.address, "DISTTRAIN_JOB_SECRET": secret, "DISTTRAIN_JOB_ID": "hvd-attacked"}

        def job():
            try:
                result["out"] = spawn(
                    "tests.cases.hvd_rendezvous:attacked",
                    2,
                    args={"port_file": port_file, "go_file": go_file},
                    env=env,
                    timeout=150,
                )
            except BaseException as exc:  # noqa: BLE001 - reported below
                result["exc"] = exc

        t = threading.Thread(target=job, daemon=True)
        t.start()
        while not os.path.exists(port_file) and t.is_alive():
            t.join(0.1)
        assert os.path.exists(port_file), result
        host, port = open(port_file).read().rsplit(":", 1)
        assert host == "127.0.0.1"
        got = run_as(other, ["/usr/bin/python3", "-c", _HTTP, host, port], timeout=60)
        assert got.returncode == 0, got.stderr
        assert "HTTP" not in got.stdout, got.stdout  # no answer at all: not a 404, not a value
        open(go_file, "w").close()
        t.join(160)
    assert "exc" not in result, result.get("exc")
    assert [r["sum"] for r in result["out"]] == [[3.0] * 4] * 2
    assert [r["sub"] for r in result["out"]] == [[2.0, 2.0]] * 2
