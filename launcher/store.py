"""The job's authenticated key-value store: where agents and workers meet.

The launcher hosts one :class:`StoreServer` on the first host; agents and workers reach it
with :class:`StoreClient` (``DISTTRAIN_STORE=host:port`` plus ``DISTTRAIN_JOB_SECRET``).
It offers what ``torch.distributed.Store`` needs (set/get/add/wait/compare_set/check/
delete_key/num_keys, blocking get with a timeout); ``launcher.torch_store`` adapts it.

Every connection first passes a mutual HMAC-SHA256 challenge-response over fresh nonces
from both sides (:mod:`hmac`, :mod:`secrets`), so a recorded handshake cannot be replayed
and a client never talks to a server that lacks the secret. Nothing from a peer is read
as a request before that; a peer that fails is closed and logged with its address, and
the job goes on. Requests are length-prefixed binary frames of byte strings: no pickle,
nothing a stranger sends is ever evaluated. The channel is authenticated, not encrypted:
run jobs on a network you trust not to read traffic.

Wire format (after the handshake), both directions::

    frame  = u32 length | u8 code | field*      (length counts code and fields)
    field  = u32 length | bytes
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import socket
import struct
import threading
import time

from .errors import LauncherError

log = logging.getLogger(__name__)

MAGIC = b"DTSTORE1"
NONCE = 32
MAC = hashlib.sha256().digest_size
MAX_FRAME = 64 << 20  # a store holds addresses and small blobs; anything larger is a stranger
HANDSHAKE_TIMEOUT = 5.0

# request codes
SET, GET, ADD, CHECK, WAIT, CAS, DELETE, NUM_KEYS, APPEND, MULTI_GET, MULTI_SET, PING = range(1, 13)
# reply codes
OK, TIMEOUT, ERROR = 0, 1, 2

_U32 = struct.Struct("!I")
_HEAD = struct.Struct("!IB")


class StoreError(LauncherError):
    """The store refused a request or could not be reached."""


class StoreAuthError(StoreError):
    """The handshake failed: wrong secret, or not our store."""


class StoreTimeout(StoreError, TimeoutError):
    """A blocking get/wait ran past its timeout."""


def new_secret() -> str:
    return secrets.token_hex(32)


def _mac(secret: bytes, label: bytes, *parts: bytes) -> bytes:
    return hmac.new(secret, label + b"".join(parts), hashlib.sha256).digest()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed the connection")
        buf += chunk
    return bytes(buf)


def _pack(code: int, fields: list[bytes]) -> bytes:
    body = b"".join(_U32.pack(len(f)) + f for f in fields)
    return _HEAD.pack(1 + len(body), code) + body


def _read_frame(sock: socket.socket) -> tuple[int, list[bytes]]:
    length, code = _HEAD.unpack(_recv_exact(sock, _HEAD.size))
    if not 1 <= length <= MAX_FRAME:
        raise ValueError(f"frame of {length} bytes")
    body = _recv_exact(sock, length - 1)
    fields, i = [], 0
    while i < len(body):
        if i + 4 > len(body):
            raise ValueError("truncated field")
        (n,) = _U32.unpack_from(body, i)
        if i + 4 + n > len(body):
            raise ValueError("truncated field")
        fields.append(body[i + 4 : i + 4 + n])
        i += 4 + n
    return code, fields


def _b(x: str | bytes) -> bytes:
    return x.encode() if isinstance(x, str) else bytes(x)


class StoreServer:
    """Hosts the job's store; one thread per authenticated connection.

    Called by the launcher (or node 0's agent in torchrun-style manual starts) once per
    job: ``start()``, hand ``address`` and the secret to agents, ``close()`` at the end.
    """

    def __init__(self, secret: str, host: str = "127.0.0.1", port: int = 0, *, advertise: str | None = None):
        self._secret = _b(secret)
        self.data: dict[str, bytes] = {}
        self.cond = threading.Condition()
        self.rejected: list[tuple[str, str]] = []  # (peer, why), for tests and the log
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
        self._sock.listen(128)
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
            self.data[key] = value
            self.cond.notify_all()

    # -- network ------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, peer = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn, peer), name="store-conn", daemon=True).start()

    def _reject(self, peer: str, why: str) -> None:
        self.rejected.append((peer, why))
        log.warning("rendezvous store: rejected connection from %s: %s", peer, why)

    def _handshake(self, conn: socket.socket, peer: str) -> bool:
        conn.settimeout(HANDSHAKE_TIMEOUT)
        nonce_s = secrets.token_bytes(NONCE)
        try:
            conn.sendall(MAGIC + nonce_s)
            reply = _recv_exact(conn, NONCE + MAC)
        except (OSError, ConnectionError) as exc:
            self._reject(peer, f"no handshake ({exc})")
            return False
        nonce_c, mac_c = reply[:NONCE], reply[NONCE:]
        if not hmac.compare_digest(mac_c, _mac(self._secret, b"dt-client", nonce_s, nonce_c)):
            self._reject(peer, "handshake failed (wrong secret, replayed or garbage bytes)")
            return False
        conn.sendall(_mac(self._secret, b"dt-server", nonce_c, nonce_s))
        conn.settimeout(None)
        return True

    def _serve(self, conn: socket.socket, peer_addr) -> None:
        peer = f"{peer_addr[0]}:{peer_addr[1]}"
        self._conns.add(conn)
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if not self._handshake(conn, peer):
                return
            while not self._closed:
                try:
                    code, fields = _read_frame(conn)
                except (ConnectionError, OSError):
                    return
                except (ValueError, struct.error) as exc:
                    self._reject(peer, f"malformed request ({exc})")
                    return
                try:
                    reply = self._handle(code, fields)
                except (ValueError, IndexError, UnicodeDecodeError) as exc:
                    reply = _pack(ERROR, [f"bad request {code}: {exc}".encode()])
                conn.sendall(reply)
        except OSError:
            pass
        finally:
            self._conns.discard(conn)
            conn.close()

    def _wait_for(self, keys: list[str], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not all(k in self.data for k in keys):
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    return False
                self.cond.wait(min(left, 1.0))
        return True

    def _handle(self, code: int, f: list[bytes]) -> bytes:
        d, cond = self.data, self.cond
        if code == SET:
            with cond:
                d[f[0].decode()] = f[1]
                cond.notify_all()
            return _pack(OK, [])
        if code == GET:
            key, timeout = f[0].decode(), float(f[1])
            if not self._wait_for([key], timeout):
                return _pack(TIMEOUT, [])
            with cond:
                return _pack(OK, [d[key]])
        if code == ADD:
            key, delta = f[0].decode(), int(f[1])
            with cond:
                value = int(d.get(key, b"0")) + delta
                d[key] = str(value).encode()
                cond.notify_all()
            return _pack(OK, [d[key]])
        if code == CHECK:
            with cond:
                return _pack(OK, [b"1" if all(k.decode() in d for k in f) else b"0"])
        if code == WAIT:
            ok = self._wait_for([k.decode() for k in f[1:]], float(f[0]))
            return _pack(OK if ok else TIMEOUT, [])
        if code == CAS:
            key, expected, desired = f[0].decode(), f[1], f[2]
            with cond:
                current = d.get(key)
                if (current is None and expected == b"") or current == expected:
                    d[key] = desired
                    cond.notify_all()
                    return _pack(OK, [desired])
                return _pack(OK, [expected if current is None else current])
        if code == DELETE:
            with cond:
                return _pack(OK, [b"1" if d.pop(f[0].decode(), None) is not None else b"0"])
        if code == NUM_KEYS:
            with cond:
                return _pack(OK, [str(len(d)).encode()])
        if code == APPEND:
            with cond:
                key = f[0].decode()
                d[key] = d.get(key, b"") + f[1]
                cond.notify_all()
            return _pack(OK, [])
        if code == MULTI_GET:
            keys = [k.decode() for k in f[1:]]
            if not self._wait_for(keys, float(f[0])):
                return _pack(TIMEOUT, [])
            with cond:
                return _pack(OK, [d[k] for k in keys])
        if code == MULTI_SET:
            with cond:
                for k, v in zip(f[0::2], f[1::2]):
                    d[k.decode()] = v
                cond.notify_all()
            return _pack(OK, [])
        if code == PING:
            return _pack(OK, [])
        raise ValueError("unknown request code")


class StoreClient:
    """One authenticated connection to the store; thread-safe (one request at a time).

    ``prefix`` is prepended to every key (workers get ``worker/attempt_N/``, so a restarted
    group never reads the previous attempt's keys).
    """

    def __init__(
        self, address: str, secret: str, *, timeout: float = 300.0, connect_timeout: float = 60.0, prefix: str = ""
    ):
        self.address, self.timeout, self.prefix = address, timeout, prefix
        self._secret = _b(secret)
        self._lock = threading.Lock()
        host, _, port = address.rpartition(":")
        self._hostport = (host.strip("[]"), int(port))
        self._sock = self._connect(connect_timeout)

    def _connect(self, connect_timeout: float) -> socket.socket:
        deadline = time.monotonic() + connect_timeout
        delay = 0.01
        while True:
            try:
                sock = socket.create_connection(self._hostport, timeout=max(0.1, min(5.0, deadline - time.monotonic())))
                break
            except OSError as exc:
                if time.monotonic() + delay > deadline:
                    raise StoreError(
                        f"cannot reach the rendezvous store at {self.address}: {exc}. HINT: is the "
                        "launcher running, and is that address reachable from this host?"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.settimeout(HANDSHAKE_TIMEOUT)
            hello = _recv_exact(sock, len(MAGIC) + NONCE)
            if hello[: len(MAGIC)] != MAGIC:
                raise StoreAuthError(f"{self.address} is not a disttrain rendezvous store")
            nonce_s, nonce_c = hello[len(MAGIC) :], secrets.token_bytes(NONCE)
            sock.sendall(nonce_c + _mac(self._secret, b"dt-client", nonce_s, nonce_c))
            proof = _recv_exact(sock, MAC)
            if not hmac.compare_digest(proof, _mac(self._secret, b"dt-server", nonce_c, nonce_s)):
                raise StoreAuthError(f"the store at {self.address} failed to prove it knows the job secret")
        except (OSError, ConnectionError) as exc:
            sock.close()
            raise StoreAuthError(
                f"handshake with the rendezvous store at {self.address} failed ({exc}). HINT: "
                "every host must use the same DISTTRAIN_JOB_SECRET"
            ) from None
        except StoreError:
            sock.close()
            raise
        sock.settimeout(None)
        return sock

    @property
    def secret(self) -> str:
        return self._secret.decode()

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass

    def _call(self, code: int, fields: list[bytes], what: str, wait: float | None = None) -> list[bytes]:
        with self._lock:
            # Blocking ops get the server-side timeout plus slack; others a generous one.
            self._sock.settimeout((wait if wait is not None else 0) + 60.0)
            try:
                self._sock.sendall(_pack(code, fields))
                status, out = _read_frame(self._sock)
            except (OSError, ConnectionError, ValueError) as exc:
                raise StoreError(
                    f"rendezvous store at {self.address} dropped the connection during {what}: {exc}"
                ) from None
        if status == TIMEOUT:
            raise StoreTimeout(
                f"timed out after {wait:g}s waiting for {what} in the store at {self.address}. "
                "HINT: a peer may have died before writing it; see its log"
            )
        if status != OK:
            raise StoreError(f"store at {self.address} refused {what}: {out[0].decode(errors='replace')}")
        return out

    def _k(self, key: str) -> bytes:
        return (self.prefix + key).encode()

    def set(self, key: str, value: str | bytes) -> None:
        self._call(SET, [self._k(key), _b(value)], f"set {key!r}")

    def get(self, key: str, timeout: float | None = None) -> bytes:
        t = self.timeout if timeout is None else timeout
        return self._call(GET, [self._k(key), str(t).encode()], f"key {key!r}", t)[0]

    def add(self, key: str, delta: int) -> int:
        return int(self._call(ADD, [self._k(key), str(int(delta)).encode()], f"add {key!r}")[0])

    def check(self, keys: list[str]) -> bool:
        return self._call(CHECK, [self._k(k) for k in keys], "check")[0] == b"1"

    def wait(self, keys: list[str], timeout: float | None = None) -> None:
        t = self.timeout if timeout is None else timeout
        self._call(WAIT, [str(t).encode()] + [self._k(k) for k in keys], f"keys {keys!r}", t)

    def compare_set(self, key: str, expected: str | bytes, desired: str | bytes) -> bytes:
        return self._call(CAS, [self._k(key), _b(expected), _b(desired)], f"compare_set {key!r}")[0]

    def delete_key(self, key: str) -> bool:
        return self._call(DELETE, [self._k(key)], f"delete {key!r}")[0] == b"1"

    def num_keys(self) -> int:
        return int(self._call(NUM_KEYS, [], "num_keys")[0])

    def append(self, key: str, value: str | bytes) -> None:
        self._call(APPEND, [self._k(key), _b(value)], f"append {key!r}")

    def multi_get(self, keys: list[str], timeout: float | None = None) -> list[bytes]:
        t = self.timeout if timeout is None else timeout
        return self._call(MULTI_GET, [str(t).encode()] + [self._k(k) for k in keys], f"keys {keys!r}", t)

    def multi_set(self, keys: list[str], values: list[str | bytes]) -> None:
        fields = [x for k, v in zip(keys, values) for x in (self._k(k), _b(v))]
        self._call(MULTI_SET, fields, "multi_set")

    def ping(self) -> None:
        self._call(PING, [], "ping")


def connect_from_env(timeout: float = 300.0, *, prefix: str | None = None) -> StoreClient | None:
    """The worker's client of the launcher's store, or None when not started by our launcher.

    Called by any worker, any time; keys are prefixed with ``worker/attempt_<restart>/`` unless
    ``prefix`` is given, so each restart of the group meets in a clean namespace.
    """
    address, secret = os.environ.get("DISTTRAIN_STORE"), os.environ.get("DISTTRAIN_JOB_SECRET")
    if not address or not secret:
        return None
    if prefix is None:
        prefix = f"worker/attempt_{os.environ.get('DISTTRAIN_RESTART_COUNT', '0')}/"
    return StoreClient(address, secret, timeout=timeout, prefix=prefix)
