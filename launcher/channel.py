"""The store's wire: a mutual HMAC handshake, then frames that each carry their own MAC.

Handshake (server speaks first, both sides prove the job secret over fresh nonces)::

    server -> client   MAGIC | nonce_s                      (8 + 32 bytes)
    client -> server   nonce_c | HMAC(secret, "dt-client" | nonce_s | nonce_c)
    server -> client   HMAC(secret, "dt-server" | nonce_c | nonce_s)

Both sides then derive a session key ``HMAC(secret, "dt-session" | nonce_s | nonce_c)``,
new for every connection. Every frame after the handshake, both directions::

    frame  = u32 length | u8 code | field* | mac      (length counts code and fields)
    field  = u32 length | bytes
    mac    = HMAC(session key, direction | u64 sequence | length | code | field*)

so a frame injected into a connection (no key), replayed or reordered within it (wrong
sequence), or copied from another connection or direction (other key or label) is refused
and the connection closed. The channel is authenticated, not encrypted.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import socket
import struct

from .errors import LauncherError

MAGIC = b"DTSTORE1"
NONCE = 32
MAC = hashlib.sha256().digest_size
HELLO = len(MAGIC) + NONCE
REPLY = NONCE + MAC
MAX_FRAME = 64 << 20  # a store holds addresses and small blobs; anything larger is a stranger
HANDSHAKE_TIMEOUT = 5.0  # for the whole handshake of one connection, not per read
MIN_SECRET = 32  # bytes; shorter user-given secrets are refused

_U32 = struct.Struct("!I")
_HEAD = struct.Struct("!IB")
_SEQ = struct.Struct("!Q")


class StoreError(LauncherError):
    """The store refused a request or could not be reached."""


class StoreAuthError(StoreError):
    """The handshake failed (wrong secret, not our store), or a frame failed its MAC."""


def new_secret() -> str:
    return secrets.token_hex(32)


def check_secret(secret: str, where: str) -> str:
    """Refuse a user-given secret shorter than :data:`MIN_SECRET` bytes; returns it."""
    if len(secret.encode()) < MIN_SECRET:
        raise StoreError(
            f"the job secret from {where} is {len(secret.encode())} bytes; at least {MIN_SECRET} are needed. "
            "HINT: export DISTTRAIN_JOB_SECRET=$(python -c 'import secrets; print(secrets.token_hex(32))')"
        )
    return secret


def _mac(key: bytes, label: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, label + b"".join(parts), hashlib.sha256).digest()


def client_reply(secret: bytes, hello: bytes) -> tuple[bytes, bytes]:
    """(reply to send, session key) for the server's ``hello``; raises StoreAuthError on a stranger's hello."""
    if len(hello) != HELLO or hello[: len(MAGIC)] != MAGIC:
        raise StoreAuthError("not a disttrain rendezvous store")
    nonce_s, nonce_c = hello[len(MAGIC) :], secrets.token_bytes(NONCE)
    return nonce_c + _mac(secret, b"dt-client", nonce_s, nonce_c), _mac(secret, b"dt-session", nonce_s, nonce_c)


def client_check_proof(secret: bytes, hello: bytes, reply: bytes, proof: bytes) -> bool:
    return hmac.compare_digest(proof, _mac(secret, b"dt-server", reply[:NONCE], hello[len(MAGIC) :]))


def server_hello() -> tuple[bytes, bytes]:
    """(hello to send, nonce_s)."""
    nonce_s = secrets.token_bytes(NONCE)
    return MAGIC + nonce_s, nonce_s


def server_check_reply(secret: bytes, nonce_s: bytes, reply: bytes) -> tuple[bytes, bytes] | None:
    """(proof to send, session key) when ``reply`` proves the secret, else None."""
    nonce_c, mac_c = reply[:NONCE], reply[NONCE:]
    if len(reply) != REPLY or not hmac.compare_digest(mac_c, _mac(secret, b"dt-client", nonce_s, nonce_c)):
        return None
    return _mac(secret, b"dt-server", nonce_c, nonce_s), _mac(secret, b"dt-session", nonce_s, nonce_c)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed the connection")
        buf += chunk
    return bytes(buf)


def pack(code: int, fields: list[bytes]) -> bytes:
    body = b"".join(_U32.pack(len(f)) + f for f in fields)
    return _HEAD.pack(1 + len(body), code) + body


def unpack_fields(body: bytes) -> list[bytes]:
    fields, i = [], 0
    while i < len(body):
        if i + 4 > len(body):
            raise ValueError("truncated field")
        (n,) = _U32.unpack_from(body, i)
        if i + 4 + n > len(body):
            raise ValueError("truncated field")
        fields.append(body[i + 4 : i + 4 + n])
        i += 4 + n
    return fields


class Channel:
    """MAC'd frames over one authenticated socket. Not thread-safe: one sender and one reader.

    ``client`` says which side we are: each direction has its own label and sequence.
    """

    def __init__(self, sock: socket.socket, key: bytes, *, client: bool):
        self.sock, self._key = sock, key
        self._out, self._in = (b"dt-c2s", b"dt-s2c") if client else (b"dt-s2c", b"dt-c2s")
        self._sent = self._received = 0

    def send(self, code: int, fields: list[bytes]) -> None:
        frame = pack(code, fields)
        mac = _mac(self._key, self._out, _SEQ.pack(self._sent), frame)
        self._sent += 1
        self.sock.sendall(frame + mac)

    def recv(self) -> tuple[int, list[bytes]]:
        """One frame; ValueError for a malformed one, StoreAuthError for a bad MAC, ConnectionError on EOF."""
        head = recv_exact(self.sock, _HEAD.size)
        length, code = _HEAD.unpack(head)
        if not 1 <= length <= MAX_FRAME:
            raise ValueError(f"frame of {length} bytes")
        rest = recv_exact(self.sock, length - 1 + MAC)
        body, mac = rest[:-MAC], rest[-MAC:]
        if not hmac.compare_digest(mac, _mac(self._key, self._in, _SEQ.pack(self._received), head, body)):
            raise StoreAuthError(f"frame {self._received} failed its MAC (injected, replayed or corrupted)")
        self._received += 1
        return code, unpack_fields(body)
