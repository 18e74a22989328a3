"""Horovod's rendezvous server, locked down: an unauthenticated HTTP key-value store whose keys
(peer addresses) Horovod's gloo controller reads at ``hvd.init()`` and when process sets are
added. Horovod's own ``RendezvousServer.start`` binds every interface; ours binds where
:func:`start` is told (127.0.0.1 for a job on one host), refuses on loopback every connection
that does not come from our own user (the peer's uid read from ``/proc/net/tcp``: another
user of the host can connect to loopback too), caps request bodies, and logs what it refuses.

On several hosts the server must be reachable from the other hosts and Horovod's C++ client
cannot authenticate: it binds the address the ranks are told, never ``0.0.0.0``, and
SECURITY.md says what that leaves open. Called by rank 0 of the ``horovod`` backend.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading

log = logging.getLogger(__name__)
MAX_BODY = 1 << 20  # a rendezvous value is an address; a bigger PUT is a stranger's


def _hex_addr(host: str, port: int) -> str:
    """``host:port`` as /proc/net/tcp{,6} writes it (native-endian 32-bit words, hex)."""
    ip = ipaddress.ip_address(host)
    raw = ip.packed
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return f"{words.hex().upper()}:{port:04X}"


def peer_uid(conn: socket.socket) -> int | None:
    """The uid owning the other end of an accepted loopback TCP connection (its socket is on
    this host, so the kernel lists it with its owner), or None when it cannot be found."""
    try:
        mine, theirs = conn.getsockname()[:2], conn.getpeername()[:2]
    except OSError:
        return None
    local, remote = _hex_addr(*theirs), _hex_addr(*mine)  # the peer's row: its address first
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) > 7 and cols[1] == local and cols[2] == remote:
                return int(cols[7])
    return None


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def start(bind: str, plan) -> tuple[object, int]:
    """Start the server on ``bind`` (port chosen by the kernel) with Horovod's slot ``plan``:
    (server, port). ``stop(server)`` ends it."""
    from horovod.runner.http.http_server import RendezvousHandler, RendezvousHTTPServer

    owner = os.geteuid()
    local = is_loopback(bind)

    class Handler(RendezvousHandler):
        def do_PUT(self):  # noqa: N802 - http.server's naming
            try:
                length = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_BODY:
                log.warning("horovod rendezvous: refused a PUT of %s bytes from %s", length, self.client_address)
                self.send_status_code(400)
                return
            super().do_PUT()

    class Server(RendezvousHTTPServer):
        def verify_request(self, request, client_address) -> bool:
            if not local:
                return True
            uid = peer_uid(request)
            if uid != owner:
                log.warning(
                    "horovod rendezvous: refused a connection from %s:%s (uid %s, not %s)",
                    client_address[0],
                    client_address[1],
                    uid,
                    owner,
                )
                return False
            return True

    server = Server((bind, 0), Handler, 0)
    server.init(plan)
    threading.Thread(target=server.serve_forever, name="horovod-rendezvous", daemon=True).start()
    return server, server.server_address[1]


def stop(server) -> None:
    server.shutdown()
    server.server_close()
