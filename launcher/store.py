"""The job's authenticated key-value store: where agents and workers meet.

The launcher hosts one :class:`StoreServer` on the first host; agents and workers reach it
with :class:`StoreClient` (``DISTTRAIN_STORE=host:port`` plus ``DISTTRAIN_JOB_SECRET``).
It offers what ``torch.distributed.Store`` needs (set/get/add/wait/compare_set/check/
delete_key/num_keys, blocking get with a timeout); ``launcher.torch_store`` adapts it.

Every connection first passes a mutual HMAC-SHA256 challenge-response over fresh nonces
from both sides, then every frame carries a MAC under a per-connection session key (see
:mod:`launcher.channel`): a recorded handshake cannot be replayed, a frame cannot be
injected, and a client never talks to a server that lacks the secret. Nothing from a peer
is read as a request before that. Before a peer has proven itself it costs the server one
socket in a single non-blocking handshake loop: one deadline for the whole handshake, at
most ``MAX_PENDING`` in flight (the oldest is dropped for a newcomer), and an accept loop
that sheds strangers when file descriptors run out. A peer that fails is closed and logged
with its address, and the job goes on. Requests are byte strings: no pickle, nothing a
stranger sends is ever evaluated. The channel is authenticated, not encrypted: run jobs
on a network you trust not to read traffic.

The client side, :class:`StoreClient` and :func:`connect_from_env` for workers, lives in
:mod:`launcher.store_client` (re-exported here).
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import selectors
import socket
import struct
import threading
import time

from .channel import (
    HANDSHAKE_TIMEOUT,
    MAC,
    MAGIC,
    MAX_FRAME,
    NONCE,
    SALT,
    Channel,
    StoreAuthError,
    StoreError,
    check_secret,
    job_field,
    new_secret,
    reply_size,
    server_check_reply,
    server_hello,
    stretch,
)
from .store_client import (
    ADD,
    APPEND,
    CAS,
    CHECK,
    DELETE,
    ERROR,
    GET,
    MULTI_GET,
    MULTI_SET,
    NUM_KEYS,
    OK,
    PING,
    SET,
    SET_BULK,
    TIMEOUT,
    WAIT,
    StoreClient,
    StoreTimeout,
    _b,
    connect_from_env,
    env_has_store,
)

__all__ = ["MAGIC", "NONCE", "MAC", "StoreAuthError", "StoreClient", "StoreError", "StoreServer", "StoreTimeout"]
__all__ += ["check_secret", "connect_from_env", "env_has_store", "new_secret"]

log = logging.getLogger(__name__)

MAX_PENDING = 256  # connections still in their handshake; the oldest is dropped for a new one
# What one job may keep in its store. Agents and workers store addresses, counters and small
# blobs; a proven but faulty (or compromised) client that floods keys or APPENDs gets an error
# reply instead of taking the launcher's memory, and the job goes on.
MAX_VALUE = 32 << 20  # bytes in one value (APPEND included)
MAX_TOTAL = 1 << 30  # bytes in all keys and values
MAX_KEYS = 1 << 20
MAX_CONNECTIONS = 4096  # authenticated connections served at once (a thread each)
MAX_REPLY = MAX_FRAME - (1 << 20)  # a reply stays under the frame limit the client enforces
KEEPALIVE = (60, 10, 6)  # idle s, interval s, probes: a partitioned client's thread ends in ~2 min
_ACCEPT_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class _Refused(Exception):
    """A request the store answers with ERROR (over a quota, a reply too large)."""


def _keepalive(conn: socket.socket) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    idle, interval, count = KEEPALIVE
    for opt, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", count)):
        if hasattr(socket, opt):  # Linux; other systems keep their defaults
            conn.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)


class _Pending:
    """A connection in its handshake: what the server sent, what came back so far, until when."""

    __slots__ = ("peer", "nonce", "buf", "deadline")

    def __init__(self, peer: str, nonce: bytes, deadline: float):
        self.peer, self.nonce, self.buf, self.deadline = peer, nonce, b"", deadline


class _RejectLog:
    """Logs rejected peers, at most ``burst`` lines a second (a flood gets one summary line)."""

    def __init__(self, burst: int = 20):
        self.burst, self._window, self._count, self._dropped = burst, 0, 0, 0
        self.recent: collections.deque[tuple[str, str]] = collections.deque(maxlen=1000)

    def __call__(self, peer: str, why: str) -> None:
        self.recent.append((peer, why))
        now = int(time.monotonic())
        if now != self._window:
            if self._dropped:
                log.warning("rendezvous store: %d more connections rejected (not logged one by one)", self._dropped)
            self._window, self._count, self._dropped = now, 0, 0
        self._count += 1
        if self._count <= self.burst:
            log.warning("rendezvous store: rejected connection from %s: %s", peer, why)
        else:
            self._dropped += 1


class StoreServer:
    """Hosts the job's store; one thread per authenticated connection.

    Called by the launcher (or node 0's agent in torchrun-style manual starts) once per
    job: ``start()``, hand ``address`` and the secret to agents, ``close()`` at the end.
    ``max_value`` and ``max_total`` bound one value and all bytes held (a subclass may change them).
    """

    max_value: int | None = None  # None: the module's MAX_VALUE, read at each request
    max_total: int | None = None  # None: MAX_TOTAL
    bulk_codes: frozenset[int] = frozenset()  # requests whose last field the channel MAC leaves out (none here)

    @property
    def value_cap(self) -> int:
        return self.max_value or MAX_VALUE

    @property
    def total_cap(self) -> int:
        return self.max_total or MAX_TOTAL

    def __init__(
        self, secret: str, host: str = "127.0.0.1", port: int = 0, *, advertise: str | None = None, job: str = ""
    ):
        self.job = job  # clients must claim this job id in their handshake (launcher.channel)
        job_field(job)  # too long for the handshake: refused here, not at every client
        self._salt = os.urandom(SALT)  # this store's (this job's) salt of the secret
        self._key = stretch(_b(secret), self._salt)
        self.data: dict[str, bytes] = {}
        self.nbytes = 0  # keys and values, kept by _put/_pop under ``cond``
        self.cond = threading.Condition()
        self._reject = _RejectLog()
        self.rejected = self._reject.recent  # (peer, why) of the latest 1,000 rejections
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host, port))
        except OSError as exc:
            self._sock.close()
            raise StoreError(
                f"cannot open the rendezvous store on {advertise or host}:{port}: {exc.strerror}. HINT: "
                + (
                    "the port is in use; pick another port or leave it out for a free one"
                    if exc.errno == 98
                    else f"{host} is not an address of this machine; start the launcher on the first "
                    "host or pass --rdzv-endpoint with an address of this machine"
                )
            ) from None
        self._sock.listen(1024)
        self._sock.setblocking(False)
        self.host, self.port = host, self._sock.getsockname()[1]
        self.address = f"{advertise or host}:{self.port}"
        self._conns: set[socket.socket] = set()
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, name="store-accept", daemon=True)

    def start(self) -> StoreServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._closed = True
        with self.cond:
            self.cond.notify_all()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        for c in list(self._conns):
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(2.0)

    def __enter__(self) -> StoreServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- in-process access for the launcher ---------------------------------------------
    def get_local(self, key: str) -> bytes | None:
        with self.cond:
            return self.data.get(key)

    def keys_with_prefix(self, prefix: str) -> dict[str, bytes]:
        with self.cond:
            return {k: v for k, v in self.data.items() if k.startswith(prefix)}

    def set_local(self, key: str, value: bytes) -> None:
        with self.cond:
            self._put(key, value, quota=False)
            self.cond.notify_all()

    def _put(self, key: str, value: bytes, quota: bool = True) -> None:
        """Store ``key`` (caller holds ``cond``); over a quota raises _Refused and changes nothing."""
        old = self.data.get(key)
        grow = len(value) - (len(old) if old is not None else -len(key))
        if quota:
            if len(value) > self.value_cap:
                raise _Refused(f"value of {key!r} is {len(value)} bytes, over the limit of {self.value_cap}")
            if old is None and len(self.data) >= MAX_KEYS:
                raise _Refused(f"the store holds {len(self.data)} keys, the limit")
            if self.nbytes + grow > self.total_cap:
                raise _Refused(f"the store holds {self.nbytes} bytes; {key!r} would pass the limit of {self.total_cap}")
        self.data[key] = value
        self.nbytes += grow

    def _pop(self, key: str) -> bytes | None:
        value = self.data.pop(key, None)
        if value is not None:
            self.nbytes -= len(key) + len(value)
        return value

    # -- network ------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        """One thread accepts and runs every handshake (non-blocking, bounded); only a peer that
        proved the secret gets a thread of its own. Strangers cost one socket each, at most
        ``MAX_PENDING`` of them for at most ``HANDSHAKE_TIMEOUT`` seconds."""
        sel = selectors.DefaultSelector()
        try:
            sel.register(self._sock, selectors.EVENT_READ)
        except (OSError, ValueError):  # closed before this thread began (a store started and closed at once)
            sel.close()
            if not self._closed:
                log.exception("rendezvous store: the accept loop could not start")
            return
        pending: dict[socket.socket, _Pending] = {}  # insertion order: oldest first

        def drop(conn: socket.socket, why: str | None) -> None:
            p = pending.pop(conn)
            sel.unregister(conn)
            conn.close()
            if why is not None:
                self._reject(p.peer, why)

        try:
            while not self._closed:
                now = time.monotonic()
                for conn in [c for c, p in pending.items() if p.deadline <= now]:
                    drop(conn, f"no handshake within {HANDSHAKE_TIMEOUT:g}s")
                wait = min((p.deadline for p in pending.values()), default=now + 0.2) - now
                for key, _ in sel.select(max(0.0, min(wait, 0.2))):
                    if key.fileobj is self._sock:
                        self._accept_some(sel, pending, drop)
                    elif key.fileobj in pending:
                        self._advance(key.fileobj, pending, sel, drop)
        except OSError:
            if not self._closed:
                log.exception("rendezvous store: the accept loop failed")
        finally:
            for conn in list(pending):
                drop(conn, None)
            sel.close()

    def _accept_some(self, sel, pending: dict, drop) -> None:
        for _ in range(64):  # a burst, then back to the handshakes in flight
            try:
                conn, addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _ACCEPT_ERRORS:  # out of descriptors: shed the oldest stranger, go on
                    log.warning("rendezvous store: accept failed (%s); dropping the oldest handshake", exc.strerror)
                    if pending:
                        drop(next(iter(pending)), "dropped: out of file descriptors")
                    else:
                        time.sleep(0.05)
                    return
                if self._closed:
                    return
                raise
            peer = f"{addr[0]}:{addr[1]}"
            if len(pending) >= MAX_PENDING:
                drop(next(iter(pending)), f"dropped: {MAX_PENDING} handshakes in flight")
            hello, nonce = server_hello(self._salt)
            try:
                conn.setblocking(False)
                conn.send(hello)  # 40 bytes into an empty socket buffer: never short
            except OSError:
                conn.close()
                continue
            pending[conn] = _Pending(peer, nonce, time.monotonic() + HANDSHAKE_TIMEOUT)
            sel.register(conn, selectors.EVENT_READ)

    def _advance(self, conn: socket.socket, pending: dict, sel, drop) -> None:
        p = pending[conn]
        want = reply_size(p.buf) if p.buf else 1  # the job id's length byte first: at most 1 + 255 + REPLY
        try:
            chunk = conn.recv(want - len(p.buf))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            drop(conn, f"no handshake ({exc})")
            return
        if not chunk:
            drop(conn, "closed during the handshake")
            return
        p.buf += chunk
        if len(p.buf) < reply_size(p.buf):
            return
        ok = server_check_reply(self._key, p.nonce, p.buf, self.job)
        if isinstance(ok, str):
            drop(conn, ok)
            return
        del pending[conn]
        sel.unregister(conn)
        proof, key = ok
        if len(self._conns) >= MAX_CONNECTIONS:
            conn.close()
            self._reject(p.peer, f"proven, but {MAX_CONNECTIONS} connections are being served already")
            return
        try:
            conn.setblocking(True)
            conn.settimeout(HANDSHAKE_TIMEOUT)
            conn.sendall(proof)
            conn.settimeout(None)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _keepalive(conn)
            self._conns.add(conn)
            threading.Thread(
                target=self._serve, args=(Channel(conn, key, client=False), p.peer), name="store-conn", daemon=True
            ).start()
        except (OSError, RuntimeError) as exc:  # RuntimeError: can't start a new thread
            self._conns.discard(conn)
            conn.close()
            log.warning("rendezvous store: could not serve %s: %s", p.peer, exc)

    def _serve(self, chan: Channel, peer: str) -> None:
        conn = chan.sock
        try:
            while not self._closed:
                try:
                    code, fields = chan.recv(self.bulk_codes)
                except (ConnectionError, OSError):
                    return
                except StoreAuthError as exc:
                    self._reject(peer, str(exc))
                    return
                except (ValueError, struct.error) as exc:
                    self._reject(peer, f"malformed request ({exc})")
                    return
                try:
                    status, out = self._handle(code, fields)
                    if sum(4 + len(f) for f in out) > MAX_REPLY:
                        raise _Refused(f"the reply would be {sum(len(f) for f in out)} bytes, over {MAX_REPLY}")
                except _Refused as exc:
                    self._reject(peer, f"request {code} refused: {exc}")
                    status, out = ERROR, [str(exc).encode()]
                except (ValueError, IndexError, KeyError, UnicodeDecodeError, OverflowError) as exc:
                    status, out = ERROR, [f"bad request {code}: {exc!r}".encode()]
                chan.send(status, out)
        except OSError:
            pass
        finally:
            self._conns.discard(conn)
            conn.close()

    def _wait_for(self, keys: list[str], timeout: float) -> list[bytes] | None:
        """The values of ``keys`` once all are present (read under the same lock, so a DELETE
        racing the wait cannot fail the read), or None at the timeout."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while not all(k in self.data for k in keys):
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    return None
                self.cond.wait(min(left, 1.0))
            return [self.data[k] for k in keys]

    def _handle(self, code: int, f: list[bytes]) -> tuple[int, list[bytes]]:
        d, cond = self.data, self.cond
        if code == SET or (code == SET_BULK and code in self.bulk_codes):
            with cond:
                self._put(f[0].decode(), f[1])
                cond.notify_all()
            return (OK, [])
        if code == GET:
            values = self._wait_for([f[0].decode()], float(f[1]))
            return (TIMEOUT, []) if values is None else (OK, values)
        if code == ADD:
            key, delta = f[0].decode(), int(f[1])
            with cond:
                value = str(int(d.get(key, b"0")) + delta).encode()
                self._put(key, value)
                cond.notify_all()
            return (OK, [value])
        if code == CHECK:
            with cond:
                return (OK, [b"1" if all(k.decode() in d for k in f) else b"0"])
        if code == WAIT:
            ok = self._wait_for([k.decode() for k in f[1:]], float(f[0])) is not None
            return (OK if ok else TIMEOUT, [])
        if code == CAS:
            key, expected, desired = f[0].decode(), f[1], f[2]
            with cond:
                current = d.get(key)
                if (current is None and expected == b"") or current == expected:
                    self._put(key, desired)
                    cond.notify_all()
                    return (OK, [desired])
                return (OK, [expected if current is None else current])
        if code == DELETE:
            with cond:
                return (OK, [b"1" if self._pop(f[0].decode()) is not None else b"0"])
        if code == NUM_KEYS:
            with cond:
                return (OK, [str(len(d)).encode()])
        if code == APPEND:
            with cond:
                key = f[0].decode()
                old = d.get(key, b"")
                if len(old) + len(f[1]) > self.value_cap:  # checked before the copy is made
                    raise _Refused(f"appending {len(f[1])} bytes to {key!r} passes the limit of {self.value_cap}")
                self._put(key, old + f[1])
                cond.notify_all()
            return (OK, [])
        if code == MULTI_GET:
            values = self._wait_for([k.decode() for k in f[1:]], float(f[0]))
            return (TIMEOUT, []) if values is None else (OK, values)
        if code == MULTI_SET:
            with cond:
                pairs = [(k.decode(), v) for k, v in zip(f[0::2], f[1::2])]
                if (
                    len(f) % 2
                    or any(len(v) > self.value_cap for _, v in pairs)
                    or sum(len(k) + len(v) for k, v in pairs) > self.total_cap - self.nbytes
                ):
                    raise _Refused(
                        "multi_set: odd field count, a value over the limit, or more bytes than there is room for"
                    )
                for k, v in pairs:
                    self._put(k, v)
                cond.notify_all()
            return (OK, [])
        if code == PING:
            return (OK, [])
        raise ValueError("unknown request code")
