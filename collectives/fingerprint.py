"""What a rank says about a collective before it runs it, so that ranks can compare.

A :class:`Fingerprint` names the op, its sequence number in the group, shapes, dtype,
root/reduce-op and the user's call site. Ranks agree when their ``digest()`` agree
(rank and call site are excluded: they differ legitimately). On a mismatch, every rank
raises :func:`mismatch_error` naming both sides.

Cost matters: the communicator builds one per op. The hash of everything but ``seq`` is
computed once per distinct call (shape, dtype, op...) and passed in as ``base`` (or cached
here), the digest mixes it with ``seq`` in a few integer operations, and the call site is
kept as (file, line) and formatted only when a message needs it.

Backends either exchange fingerprints inline with their own synchronisation (they declare
``checks_inline = True`` and accept a ``fingerprint=`` keyword on every op), or the
communicator runs a separate check before the op (see ``collectives.checks``).
"""

from __future__ import annotations

import json
import os
import sys

import xxhash

from .errors import CollectiveMismatchError

ENCODED_SIZE = 512  # fixed-size slot so a fingerprint fits a shared-memory control block
_MASK = 0x7FFF_FFFF_FFFF_FFFF
_bases: dict = {}


def base_digest(op: str, group: str, shapes: tuple, dtype: str, extra: str) -> int:
    """Hash of what must agree except the sequence number (cached: a training loop repeats a few dozen calls)."""
    key = (op, group, shapes, dtype, extra)
    base = _bases.get(key)
    if base is None:
        if len(_bases) > 4096:
            _bases.clear()
        base = _bases[key] = (xxhash.xxh64_intdigest(repr(key).encode()) & _MASK) or 1
    return base


class Fingerprint:
    """One rank's description of one op. ``site`` is ``"file:line"``: given as a string, as a
    ``(file, line)`` pair, or None: read off the stack when first needed (an error message, raised
    while the op is still on the stack), never on the hot path."""

    __slots__ = ("seq", "op", "group", "shapes", "dtype", "extra", "rank", "_site", "base")

    def __init__(
        self,
        seq: int,
        op: str,
        group: str,
        shapes: tuple[tuple[int, ...], ...],
        dtype: str,
        extra: str,  # reduce op, root, peer: whatever else must agree
        rank: int,
        site: str | tuple[str, int] | None,
        base: int = 0,
    ):
        self.seq, self.op, self.group, self.shapes, self.dtype = seq, op, group, shapes, dtype
        self.extra, self.rank, self._site = extra, rank, site
        # the hash of everything but seq (``base_digest``), computed now unless given: digest() stays a xor
        self.base = base or base_digest(op, group, shapes, dtype, extra)

    @property
    def site(self) -> str:
        site = self._site
        if site is None:  # the op is on the stack: its caller is the first frame outside this package
            site = self._site = call_site()
        if type(site) is tuple:
            site = self._site = f"{site[0]}:{site[1]}"
        return site

    def digest(self) -> int:
        """63-bit digest of everything that must agree across ranks (never 0). The base is a 63-bit hash,
        so two ops collide only if their bases differ by exactly their sequence numbers' xor (odds ~2^-63).
        Hot paths may inline it as ``(fp.base ^ fp.seq) or 1``."""
        return (self.base ^ self.seq) or 1

    def _fields(self) -> dict:
        return {
            "seq": self.seq,
            "op": self.op,
            "group": self.group,
            "shapes": self.shapes,
            "dtype": self.dtype,
            "extra": self.extra,
            "rank": self.rank,
            "site": self.site,
        }

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Fingerprint) and self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash((self.seq, self.op, self.group, self.shapes, self.dtype, self.extra, self.rank))

    def __repr__(self) -> str:
        return "Fingerprint(" + ", ".join(f"{k}={v!r}" for k, v in self._fields().items()) + ")"

    def encode(self) -> bytes:
        fields = self._fields()
        raw = json.dumps(fields, separators=(",", ":")).encode()
        if len(raw) > ENCODED_SIZE:  # very long shape lists or paths: keep what matters most
            raw = json.dumps({**fields, "shapes": [["..."]], "site": self.site[-120:]}).encode()
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
_INSIDE: dict[str, bool] = {}  # co_filename -> inside this package (cached: abspath on every op is too slow)


def call_site(depth: int = 1) -> tuple[str, int] | str:
    """(file, line) of the first frame outside the collectives package (the user's call), starting
    ``depth`` frames above the caller."""
    frame = sys._getframe(depth)
    while frame is not None:
        name = frame.f_code.co_filename
        inside = _INSIDE.get(name)
        if inside is None:
            inside = _INSIDE[name] = os.path.abspath(name).startswith(_HERE)
        if not inside:
            return (name, frame.f_lineno)
        frame = frame.f_back
    return "<unknown>"


def mismatch_error(mine: Fingerprint, theirs: Fingerprint) -> CollectiveMismatchError:
    return CollectiveMismatchError(
        f"collective mismatch in group {mine.group!r} at call #{mine.seq}:\n"
        f"  {mine.describe()}\n  {theirs.describe()}\n"
        "HINT: every rank of a group must call the same collectives in the same order with the same "
        "shapes and dtypes; look for a rank-dependent branch or uneven data."
    )
