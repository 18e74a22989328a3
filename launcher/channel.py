"""The store's wire: a mutual HMAC handshake, then frames that each carry their own MAC.

Handshake (server speaks first, both sides prove the job secret over fresh nonces)::

    server -> client   MAGIC | salt | nonce_s               (8 + 16 + 32 bytes)
    client -> server   job | nonce_c | HMAC(k, "dt-client" | job | nonce_s | nonce_c)
    server -> client   HMAC(k, "dt-server" | job | nonce_c | nonce_s)

where ``job = u8 length | the job id`` (UTF-8, at most 255 bytes; ``MAGIC`` names protocol 3,
the first to carry it). The server checks the client's MAC over the id the client claims, then
that id against its own: a client of another job that reuses the secret proves the secret but
is refused, and the store logs it as such (the job id names the job, the secret proves
membership; a reused secret no longer joins two jobs). The server's proof and the session key
cover the same id, so a client never talks to another job's store either.

where ``k = PBKDF2-HMAC-SHA256(secret, "disttrain-store|" | salt, STRETCH)`` and ``salt`` is
drawn once per store (per job). A recorded handshake lets whoever holds it test guesses of
the secret offline; the stretch makes each guess cost ``STRETCH`` hash rounds, the salt keeps
one job's table from serving another, and user-given secrets that an estimate already shows
to be guessable are refused (:func:`check_secret`). Both sides then derive a session key
``HMAC(k, "dt-session" | job | nonce_s | nonce_c)``, new for every connection. Every frame after the handshake, both directions::

    frame  = u32 length | u8 code | field* | mac      (length counts code and fields)
    field  = u32 length | bytes
    mac    = HMAC(session key, direction | u64 sequence | length | code | field*)

so a frame injected into a connection (no key), replayed or reordered within it (wrong
sequence), or copied from another connection or direction (other key or label) is refused
and the connection closed. The channel is authenticated, not encrypted.

Bulk frames (:meth:`Channel.send_bulk`, accepted only where the receiver names the code in
``bulk``): the last field's *bytes* are left out of the MAC (its length is in it), so a peer
can move a large blob without both sides hashing it. Only for blobs that carry their own
end-to-end tag, verified by whoever uses them (peer replicas: ``disttrain.fault.tag``); an
on-path change of those bytes is caught there, before use, and everything else in the
frame (code, key, length, sequence) is still covered here.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import hmac
import math
import secrets
import socket
import struct

from .errors import LauncherError

MAGIC = b"DTSTORE3"  # protocol 3: the job id is bound into the handshake
SALT = 16
NONCE = 32
MAC = hashlib.sha256().digest_size
HELLO = len(MAGIC) + SALT + NONCE
STRETCH = 100_000  # PBKDF2 rounds: tens of ms once per process and store, per guess for an attacker
REPLY = NONCE + MAC  # after the client's job id (1 + its length bytes)
MAX_JOB_ID = 255  # bytes of a job id in the handshake
MAX_FRAME = 64 << 20  # a store holds addresses and small blobs; anything larger is a stranger
HANDSHAKE_TIMEOUT = 5.0  # for the whole handshake of one connection, not per read
MIN_SECRET = 32  # bytes; shorter user-given secrets are refused
MIN_SECRET_BITS = 80  # estimated entropy (entropy_bits); user-given secrets below it are refused

_U32 = struct.Struct("!I")
_HEAD = struct.Struct("!IB")
_SEQ = struct.Struct("!Q")


class StoreError(LauncherError):
    """The store refused a request or could not be reached."""


class StoreAuthError(StoreError):
    """The handshake failed (wrong secret, not our store), or a frame failed its MAC."""


def new_secret() -> str:
    return secrets.token_hex(32)


def entropy_bits(secret: str) -> float:
    """An upper estimate of a secret's entropy: the length of its shortest repeating unit times
    the Shannon entropy of that unit's characters. ``"a" * 32`` and ``"0123456789abcdef" * 4``
    estimate 0 and 64 bits, a 64-digit random hex token about 250. A low estimate proves the
    secret is guessable; a high one does not prove it is not."""
    n = len(secret)
    period = next((p for p in range(1, n // 2 + 1) if n % p == 0 and secret == secret[:p] * (n // p)), n)
    unit = secret[:period]
    if not unit:
        return 0.0
    counts = collections.Counter(unit)
    return period * -sum(c / period * math.log2(c / period) for c in counts.values())


def check_secret(secret: str, where: str) -> str:
    """Refuse a user-given secret shorter than :data:`MIN_SECRET` bytes or with fewer than
    :data:`MIN_SECRET_BITS` estimated bits (a repeated character, a short word repeated): every
    handshake gives whoever squats the store's port material to guess it offline. Returns it."""
    hint = "HINT: export DISTTRAIN_JOB_SECRET=$(python -c 'import secrets; print(secrets.token_hex(32))')"
    if len(secret.encode()) < MIN_SECRET:
        raise StoreError(
            f"the job secret from {where} is {len(secret.encode())} bytes; at least {MIN_SECRET} are needed. {hint}"
        )
    bits = entropy_bits(secret)
    if bits < MIN_SECRET_BITS:
        raise StoreError(
            f"the job secret from {where} is guessable: about {bits:.0f} bits of entropy at most, "
            f"{MIN_SECRET_BITS} are needed. {hint}"
        )
    return secret


def derive_job_id(endpoint: str, secret: str) -> str:
    """The job id of a manual multi-node start given none (``--nnodes N --rdzv-endpoint HOST:PORT``
    on every node, no ``--run-id``): every node computes the same from what they already share,
    and it reveals nothing of the secret. Nodes that spell the endpoint differently get different
    ids, and the store refuses them with both ids in its log: pass ``--run-id`` then."""
    digest = hmac.new(secret.encode(), b"disttrain-job-id|" + endpoint.strip().lower().encode(), hashlib.sha256)
    return "job-" + digest.hexdigest()[:12]


def _mac(key: bytes, label: bytes, *parts) -> bytes:
    """HMAC-SHA256 of ``label`` and ``parts`` concatenated (fed one by one: a large frame is never copied)."""
    h = hmac.new(key, label, hashlib.sha256)
    for p in parts:
        h.update(p)
    return h.digest()


@functools.lru_cache(maxsize=16)
def stretch(secret: bytes, salt: bytes) -> bytes:
    """The handshake key of ``secret`` for the store whose salt is ``salt`` (cached per process)."""
    return hashlib.pbkdf2_hmac("sha256", secret, b"disttrain-store|" + salt, STRETCH)


def _split(hello: bytes) -> tuple[bytes, bytes]:
    """(salt, nonce_s) of a hello."""
    return bytes(hello[len(MAGIC) : len(MAGIC) + SALT]), bytes(hello[len(MAGIC) + SALT :])


def job_field(job: str) -> bytes:
    """The job id as the handshake carries it: ``u8 length | UTF-8``."""
    raw = job.encode()
    if len(raw) > MAX_JOB_ID:
        raise StoreError(f"job id {job[:40]!r}... is {len(raw)} bytes; at most {MAX_JOB_ID} fit the handshake")
    return bytes([len(raw)]) + raw


def reply_size(head: bytes) -> int:
    """Bytes of the client's whole reply, once its first byte (the job id's length) is known."""
    return 1 + head[0] + REPLY


def client_reply(secret: bytes, hello: bytes, job: str = "") -> tuple[bytes, bytes]:
    """(reply to send, session key) for the server's ``hello``; raises StoreAuthError on a stranger's hello."""
    if len(hello) != HELLO or hello[: len(MAGIC)] != MAGIC:
        raise StoreAuthError("not a disttrain rendezvous store (or one of another protocol version)")
    salt, nonce_s = _split(hello)
    k, nonce_c, j = stretch(secret, salt), secrets.token_bytes(NONCE), job_field(job)
    return j + nonce_c + _mac(k, b"dt-client", j, nonce_s, nonce_c), _mac(k, b"dt-session", j, nonce_s, nonce_c)


def client_check_proof(secret: bytes, hello: bytes, reply: bytes, proof: bytes) -> bool:
    salt, nonce_s = _split(hello)
    j = reply[: 1 + reply[0]]
    return hmac.compare_digest(
        proof, _mac(stretch(secret, salt), b"dt-server", j, reply[len(j) : len(j) + NONCE], nonce_s)
    )


def server_hello(salt: bytes) -> tuple[bytes, bytes]:
    """(hello to send, nonce_s) of a store whose salt is ``salt``."""
    nonce_s = secrets.token_bytes(NONCE)
    return MAGIC + salt + nonce_s, nonce_s


def server_check_reply(key: bytes, nonce_s: bytes, reply: bytes, job: str = "") -> tuple[bytes, bytes] | str:
    """(proof to send, session key) when ``reply`` proves the secret (``key`` is its :func:`stretch`)
    for this store's ``job``; else why it is refused (for the log)."""
    if not reply or len(reply) != reply_size(reply):
        return "handshake failed (garbage bytes)"
    j = reply[: 1 + reply[0]]
    nonce_c, mac_c = reply[len(j) : len(j) + NONCE], reply[len(j) + NONCE :]
    if not hmac.compare_digest(mac_c, _mac(key, b"dt-client", j, nonce_s, nonce_c)):
        return "handshake failed (wrong secret, replayed or garbage bytes)"
    if not hmac.compare_digest(j, job_field(job)):
        theirs = j[1:].decode(errors="replace")
        return (
            f"a client of job {theirs!r} proved the secret, but this store serves job {job!r}: "
            "the secret is reused across jobs; refused"
        )
    return _mac(key, b"dt-server", j, nonce_c, nonce_s), _mac(key, b"dt-session", j, nonce_s, nonce_c)


def recv_exact(sock: socket.socket, n: int) -> bytearray:
    """Exactly ``n`` bytes, received into one buffer (no per-chunk concatenation)."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if not k:
            raise ConnectionError("peer closed the connection")
        got += k
    return buf


def _parts(code: int, fields: list[bytes]) -> list[bytes]:
    """A frame as its pieces (header, then each field's length and bytes), to MAC and join once."""
    parts = [b""]
    for f in fields:
        parts += [_U32.pack(len(f)), f]
    parts[0] = _HEAD.pack(1 + sum(len(p) for p in parts), code)
    return parts


def _sendall(sock: socket.socket, parts: list) -> None:
    """Send ``parts`` in order with ``sendmsg`` (no join: a large field is never copied in user space)."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    while views:
        n = sock.sendmsg(views[:64])
        while n:
            if n >= len(views[0]):
                n -= len(views.pop(0))
            else:
                views[0], n = views[0][n:], 0


def pack(code: int, fields: list[bytes]) -> bytes:
    return b"".join(_parts(code, fields))


def _field_spans(body) -> list[tuple[int, int]]:
    """(start, stop) of each field's bytes in ``body``; ValueError when a length runs past it."""
    spans, i = [], 0
    while i < len(body):
        if i + 4 > len(body):
            raise ValueError("truncated field")
        (n,) = _U32.unpack_from(body, i)
        if i + 4 + n > len(body):
            raise ValueError("truncated field")
        spans.append((i + 4, i + 4 + n))
        i += 4 + n
    return spans


def unpack_fields(body) -> list[bytes]:
    return [bytes(body[a:b]) for a, b in _field_spans(body)]


class Channel:
    """MAC'd frames over one authenticated socket. Not thread-safe: one sender and one reader.

    ``client`` says which side we are: each direction has its own label and sequence.
    """

    def __init__(self, sock: socket.socket, key: bytes, *, client: bool):
        self.sock, self._key = sock, key
        self._out, self._in = (b"dt-c2s", b"dt-s2c") if client else (b"dt-s2c", b"dt-c2s")
        self._sent = self._received = 0

    def send(self, code: int, fields: list) -> None:
        parts = _parts(code, fields)
        parts.append(_mac(self._key, self._out, _SEQ.pack(self._sent), *parts))
        self._sent += 1
        _sendall(self.sock, parts)

    def send_bulk(self, code: int, fields: list, bulk) -> None:
        """A frame whose last field is ``bulk``, its bytes outside the MAC (module docstring): only
        for a ``code`` the receiver accepts as bulk, and a blob its user verifies by its own tag."""
        parts = _parts(code, [*fields, bulk])
        parts.append(_mac(self._key, self._out, _SEQ.pack(self._sent), *parts[:-1]))
        self._sent += 1
        _sendall(self.sock, parts)

    def recv(self, bulk: frozenset[int] = frozenset()) -> tuple[int, list]:
        """One frame; ValueError for a malformed one, StoreAuthError for a bad MAC, ConnectionError on EOF.
        A frame whose code is in ``bulk`` was sent by :meth:`send_bulk`: its last field comes back as a
        memoryview (no copy) whose bytes the MAC did not cover."""
        head = recv_exact(self.sock, _HEAD.size)
        length, code = _HEAD.unpack(head)
        if not 1 <= length <= MAX_FRAME:
            raise ValueError(f"frame of {length} bytes")
        rest = memoryview(recv_exact(self.sock, length - 1 + MAC))
        body, mac = rest[:-MAC], bytes(rest[-MAC:])
        spans = _field_spans(body)
        covered = body[: spans[-1][0]] if code in bulk and spans else body
        if not hmac.compare_digest(mac, _mac(self._key, self._in, _SEQ.pack(self._received), head, covered)):
            raise StoreAuthError(f"frame {self._received} failed its MAC (injected, replayed or corrupted)")
        self._received += 1
        if code in bulk and spans:
            return code, [bytes(body[a:b]) for a, b in spans[:-1]] + [body[spans[-1][0] : spans[-1][1]]]
        return code, [bytes(body[a:b]) for a, b in spans]
