"""The end-to-end tag of a peer copy: one keyed pass that is both its checksum and its proof of origin.

A copy crosses the network as bulk frames whose bytes the store channel's MAC leaves out
(``launcher.channel``), and the holder keeps them as they arrived: it neither hashes nor copies them.
The writer computes this tag once per copy (not once per holder, and no separate xxh3 pass), puts it
in the copy's record (which travels MAC'd), and the reader checks it before it uses a byte, so bytes
changed on the way or in a holder's memory are refused at recovery and the disk checkpoint is used.

Algorithm: Poly1305 (``cryptography``, OpenSSL's; about 7x faster than HMAC-SHA256 on this
machine) under a one-time key ``HMAC-SHA256(key, label | nonce | rank | step | size)``, with a fresh
random nonce per copy, so no Poly1305 key ever tags two different messages; HMAC-SHA256 itself when
``cryptography`` is not installed. The record names the algorithm, so either reads the other's
copies. ``key`` is :func:`launcher.replica_tag_key` (job secret and job id): the job's workers hold
it, strangers on the network do not.

Who calls: the replica thread (:func:`sign`, once per copy), the recovery reader (:func:`verify`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct

try:
    from cryptography.hazmat.primitives.poly1305 import Poly1305
except ImportError:  # the slower standard-library tag
    Poly1305 = None

POLY1305, HMAC_SHA256 = "poly1305", "hmac-sha256"
ALGORITHM = POLY1305 if Poly1305 is not None else HMAC_SHA256
_HEAD = struct.Struct("!QQQ")  # rank, step, size: a copy cannot pass as another rank's or step's


def _one_time_key(key: bytes, nonce: bytes, head: bytes) -> bytes:
    return hmac.new(key, b"disttrain-replica-poly1305|" + nonce + head, hashlib.sha256).digest()


def _tag(alg: str, key: bytes, nonce: bytes, rank: int, step: int, data) -> str:
    head = _HEAD.pack(rank, step, len(data))
    if alg == POLY1305:
        if Poly1305 is None:
            raise ValueError("the copy is tagged with poly1305 and the cryptography package is not installed")
        p = Poly1305(_one_time_key(key, nonce, head))
        p.update(head)
        p.update(data)
        return p.finalize().hex()
    if alg == HMAC_SHA256:
        h = hmac.new(key, b"disttrain-replica-hmac|" + nonce + head, hashlib.sha256)
        h.update(data)
        return h.hexdigest()
    raise ValueError(f"unknown tag algorithm {alg!r}")


def sign(key: bytes, rank: int, step: int, data) -> dict:
    """The tag of ``data`` (bytes-like), rank ``rank``'s copy of step ``step``: ``{"alg", "nonce", "tag"}``."""
    nonce = secrets.token_bytes(16)
    return {"alg": ALGORITHM, "nonce": nonce.hex(), "tag": _tag(ALGORITHM, key, nonce, rank, step, data)}


def verify(key: bytes, rank: int, step: int, data, tag: dict) -> bool:
    """True when ``tag`` (as :func:`sign` made it) is that of ``data``; False for any change or a malformed tag."""
    try:
        want = _tag(str(tag["alg"]), key, bytes.fromhex(str(tag["nonce"])), rank, step, data)
        return hmac.compare_digest(want, str(tag["tag"]))
    except (KeyError, TypeError, ValueError):
        return False
