"""The store's client side: one authenticated connection per :class:`StoreClient`, the request
and reply codes both sides speak, and :func:`connect_from_env` for workers (see :mod:`launcher.store`
for the server, the handshake and the quotas).

Workers: :func:`connect_from_env` takes the secret out of ``os.environ`` once it has
connected, so programs the worker starts do not inherit it.
"""

from __future__ import annotations

import os
import socket
import threading
import time

from .channel import (
    HANDSHAKE_TIMEOUT,
    HELLO,
    MAC,
    Channel,
    StoreAuthError,
    StoreError,
    client_check_proof,
    client_reply,
    recv_exact,
)

# request codes
SET, GET, ADD, CHECK, WAIT, CAS, DELETE, NUM_KEYS, APPEND, MULTI_GET, MULTI_SET, PING, SET_BULK, ADOPT, PRUNE = range(
    1, 16
)
# reply codes
OK, TIMEOUT, ERROR = 0, 1, 2


class StoreTimeout(StoreError, TimeoutError):
    """A blocking get/wait ran past its timeout."""


def _b(x: str | bytes | memoryview) -> bytes | memoryview:
    """A field: text encoded, bytes-likes as they are (a large value is never copied here)."""
    if isinstance(x, str):
        return x.encode()
    return memoryview(x).cast("B") if isinstance(x, memoryview) else bytes(x) if not isinstance(x, bytes) else x


class StoreClient:
    """One authenticated connection to the store; thread-safe (one request at a time).

    ``prefix`` is prepended to every key (workers get ``worker/attempt_N/``, so a restarted
    group never reads the previous attempt's keys). ``job`` is the job id the handshake claims:
    a store of another job refuses the connection even when the secret is the same.
    """

    def __init__(
        self,
        address: str,
        secret: str,
        *,
        timeout: float = 300.0,
        connect_timeout: float = 60.0,
        prefix: str = "",
        job: str = "",
    ):
        self.address, self.timeout, self.prefix, self.job = address, timeout, prefix, job
        self._secret = _b(secret)
        self._lock = threading.Lock()
        host, _, port = address.rpartition(":")
        self._hostport = (host.strip("[]"), int(port))
        self._chan = self._connect(connect_timeout)
        self._sock = self._chan.sock

    def _connect(self, connect_timeout: float) -> Channel:
        """Connect and handshake. A connection dropped before the server's hello (a store busy
        shedding strangers) is retried until ``connect_timeout``; a refused proof is final."""
        deadline = time.monotonic() + connect_timeout
        delay = 0.01
        while True:
            try:
                sock = socket.create_connection(self._hostport, timeout=max(0.1, min(5.0, deadline - time.monotonic())))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.settimeout(max(0.1, min(HANDSHAKE_TIMEOUT, deadline - time.monotonic())))
                try:
                    hello = recv_exact(sock, HELLO)
                except BaseException:
                    sock.close()
                    raise
                break
            except OSError as exc:  # ConnectionError and socket.timeout included
                if time.monotonic() + delay > deadline:
                    raise StoreError(
                        f"cannot reach the rendezvous store at {self.address}: {exc}. HINT: is the "
                        "launcher running, and is that address reachable from this host?"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
        try:
            try:
                reply, key = client_reply(self._secret, hello, self.job)
            except StoreAuthError as exc:
                raise StoreAuthError(f"{self.address}: {exc}") from None
            sock.settimeout(HANDSHAKE_TIMEOUT)
            sock.sendall(reply)
            proof = recv_exact(sock, MAC)
            if not client_check_proof(self._secret, hello, reply, proof):
                raise StoreAuthError(f"the store at {self.address} failed to prove it knows the job secret")
        except OSError as exc:
            sock.close()
            raise StoreAuthError(
                f"handshake with the rendezvous store at {self.address} failed ({exc}); this client "
                f"claims job {self.job!r}. HINT: every host must use the same DISTTRAIN_JOB_SECRET and "
                "job id (--run-id), and a store refuses another job's clients even when the secret is reused"
            ) from None
        except StoreError:
            sock.close()
            raise
        sock.settimeout(None)
        return Channel(sock, key, client=True)

    @property
    def secret(self) -> str:
        return self._secret.decode()

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass

    def interrupt(self) -> None:
        """From another thread: fail the call in flight (and every later one) at once."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _call(self, code: int, fields: list, what: str, wait: float | None = None, bulk=None) -> list[bytes]:
        with self._lock:
            # Blocking ops get the server-side timeout plus slack; others a generous one.
            self._sock.settimeout((wait if wait is not None else 0) + 60.0)
            try:
                if bulk is None:
                    self._chan.send(code, fields)
                else:
                    self._chan.send_bulk(code, fields, bulk)
                status, out = self._chan.recv()
            except (OSError, ValueError, StoreAuthError) as exc:
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

    def set_bulk(self, key: str, value: bytes | memoryview) -> None:
        """Set a large ``value`` whose bytes the channel's MAC does not cover (``launcher.channel``):
        only for stores that accept it (:class:`launcher.replica_store.ReplicaStore`) and values that
        carry their own end-to-end tag, checked by their reader before use. No copy is made."""
        self._call(SET_BULK, [self._k(key)], f"set {key!r}", bulk=_b(value))

    def adopt(self, name: str, chunk: int, keys: list[str]) -> None:
        """Hand the store the host-local segment ``name`` (a file this host's worker wrote in the
        store's private directory): it maps it, holds it as ``keys`` (``chunk`` bytes each, in order)
        and removes the name. Only a replica store answers (``launcher.replica_store``)."""
        self._call(ADOPT, [name.encode(), str(int(chunk)).encode()] + [self._k(k) for k in keys], f"adopt {name!r}")

    def prune(self, prefixes: list[str]) -> tuple[int, int]:
        """Delete every key that starts with one of ``prefixes``: (bytes freed, bytes still held).
        Only a replica store answers (``launcher.replica_store``)."""
        freed, held = self._call(PRUNE, [self._k(p) for p in prefixes], "prune")
        return int(freed), int(held)

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


_SECRET_ENV, _STORE_ENV, _JOB_ENV = "DISTTRAIN_JOB_SECRET", "DISTTRAIN_STORE", "DISTTRAIN_JOB_ID"
_secret_taken: str | None = None  # the worker's secret once it left os.environ


def env_has_store() -> bool:
    """True when this process was started by our launcher with a store (and its secret)."""
    return bool(os.environ.get(_STORE_ENV) and (_secret_taken or os.environ.get(_SECRET_ENV)))


def connect_from_env(timeout: float = 300.0, *, prefix: str | None = None) -> StoreClient | None:
    """The worker's client of the launcher's store, or None when not started by our launcher.

    Called by any worker, any time; keys are prefixed with ``worker/attempt_<restart>/`` unless
    ``prefix`` is given, so each restart of the group meets in a clean namespace. After the
    first connection the secret is removed from ``os.environ`` (kept in this module), so a
    program the worker starts never inherits it.
    """
    global _secret_taken
    address, secret = os.environ.get(_STORE_ENV), _secret_taken or os.environ.get(_SECRET_ENV)
    if not address or not secret:
        return None
    if prefix is None:
        prefix = f"worker/attempt_{os.environ.get('DISTTRAIN_RESTART_COUNT', '0')}/"
    client = StoreClient(address, secret, timeout=timeout, prefix=prefix, job=os.environ.get(_JOB_ENV, ""))
    _secret_taken = secret
    os.environ.pop(_SECRET_ENV, None)
    return client
