"""What a rank says about a collective before it runs it, so that ranks can compare.

A :class:`Fingerprint` names the op, its sequence number in the group, shapes, dtype,
root/reduce-op and the user's call site. Ranks agree when their ``digest()`` agree
(rank and call site are excluded: they differ legitimately). On a mismatch, every rank
raises :func:`mismatch_error` naming both sides.

Backends either exchange fingerprints inline with their own synchronisation (they set
``checks_inline = True`` and accept a ``fingerprint=`` keyword on every op), or the
communicator runs a separate check before the op (see ``collectives.checks``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import xxhash

from .errors import CollectiveMismatchError

ENCODED_SIZE = 512  # fixed-size slot so a fingerprint fits a shared-memory control block


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    seq: int
    op: str
    group: str
    shapes: tuple[tuple[int, ...], ...]
    dtype: str
    extra: str  # reduce op, root, peer: whatever else must agree
    rank: int
    site: str  # file:line of the user's call

    def digest(self) -> int:
        """63-bit digest of everything that must agree across ranks."""
        key = f"{self.seq}|{self.op}|{self.group}|{self.shapes}|{self.dtype}|{self.extra}"
        return xxhash.xxh64_intdigest(key.encode()) & 0x7FFF_FFFF_FFFF_FFFF

    def encode(self) -> bytes:
        raw = json.dumps(dataclasses.asdict(self), separators=(",", ":")).encode()
        if len(raw) > ENCODED_SIZE:  # very long shape lists or paths: keep what matters most
            raw = json.dumps({**dataclasses.asdict(self), "shapes": [["..."]], "site": self.site[-120:]}).encode()
        return raw.ljust(ENCODED_SIZE, b"\0")

    @classmethod
    def decode(cls, raw: bytes) -> Fingerprint:
        d = json.loads(bytes(raw).rstrip(b"\0").decode())
        d["shapes"] = tuple(tuple(s) for s in d["shapes"])
        return cls(**d)

    def describe(self) -> str:
        shapes = ", ".join("x".join(map(str, s)) or "scalar" for s in self.shapes)
        extra = f" {self.extra}" if self.extra else ""
        return f"rank {self.rank}: {self.op}#{self.seq}{extra} shape [{shapes}] {self.dtype} at {self.site}"


_HERE = os.path.dirname(os.path.abspath(__file__))
_INSIDE: dict[str, bool] = {}  # co_filename -> inside this package (abspath per call cost ~20 us per op)


def call_site() -> str:
    """file:line of the first frame outside the collectives package (the user's call)."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename
        inside = _INSIDE.get(name)
        if inside is None:
            inside = _INSIDE[name] = os.path.abspath(name).startswith(_HERE)
        if not inside:
            break
        frame = frame.f_back
    if frame is None:
        return "<unknown>"
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"


def mismatch_error(mine: Fingerprint, theirs: Fingerprint) -> CollectiveMismatchError:
    return CollectiveMismatchError(
        f"collective mismatch in group {mine.group!r} at call #{mine.seq}:\n"
        f"  {mine.describe()}\n  {theirs.describe()}\n"
        "HINT: every rank of a group must call the same collectives in the same order with the same "
        "shapes and dtypes; look for a rank-dependent branch or uneven data."
    )
