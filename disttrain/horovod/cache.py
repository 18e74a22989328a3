"""Horovod's response cache: an op negotiated once is agreed afterwards by one bit.

A training step submits the same names with the same signatures every step. Once the table
(see ``negotiation``) has agreed on an op, every member puts it in its cache, in the same
slot (the cache changes only through agreed events, so it is identical on every member).
When that name comes back with the same announcement, a member sets the slot's bit in its
row instead of announcing it (four int64); a slot whose bit every active member set is ready,
in slot order, ahead of the table's ready list. A steady step thus costs the bit words of
the row, however many ops it has.

Any difference falls back to full negotiation: a member whose op under a cached name differs
(shape, dtype, reduce op, scale factors, root) sets the slot's *invalid* bit and announces
the op in full; every member then drops the slot, and those that had set its bit announce
their op in full in the next cycle, so the table reaches its usual verdict (a mismatch fails
on every member with Horovod's message). ``HOROVOD_CACHE_CAPACITY`` slots (default 1024, as
Horovod; 0 turns the cache off); when full, the least recently used slot is reused.

A bit set by some members only is watched like a table entry: reported as a stall after the
warning time (which ranks lack it) and failed where it was set after the shutdown time.
"""

from __future__ import annotations

import collections
import dataclasses

from .negotiation import Announcement, Failed, Ready, Stalled
from .wire import Kind, split_key

BITS = 63  # bits per int64 word of a row (the sign bit stays clear)
UNCACHED = (Kind.PROCESS_SET,)  # runs an action once: never replayed


@dataclasses.dataclass
class _Slot:
    name: int
    signature: int
    fuse: int
    aux: list[int]  # per set rank


@dataclasses.dataclass
class Decision:
    """What one cycle's bits decided (identical on every member)."""

    ready: list[Ready]
    ready_slots: list[int]  # the slot of each ready op
    failed: list[Failed]
    stalled: list[Stalled]
    dropped: list[int]  # slots invalidated or stalled out: members re-announce their ops under them
    reannounce: list[int]  # slots whose waiting ops members announce in full (a member joined)


class ResponseCache:
    """One per process set and member; used by the set's engine thread only."""

    def __init__(self, capacity: int, size: int, rank: int, *, stall_warn_s: float, stall_fail_s: float):
        self.capacity, self.size, self.rank = max(0, capacity), size, rank
        self.words = -(-self.capacity // BITS)
        self.stall_warn_ms, self.stall_fail_ms = stall_warn_s * 1e3, stall_fail_s * 1e3
        self._slots: dict[int, _Slot] = {}
        self._by_name: dict[int, int] = {}
        self._lru: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._partial: dict[int, list] = {}  # slot -> [agreed clock when first seen, warned]
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._slots)

    # -- this member's side -------------------------------------------------------------------
    def lookup(self, a: Announcement) -> tuple[int | None, str]:
        """(slot, '') on a hit; (None, why) for an op to announce in full; a negative slot -1-s
        when the name is cached in slot s with another announcement (set s's invalid bit)."""
        if not self.capacity:
            return None, "cache off (HOROVOD_CACHE_CAPACITY=0)"
        slot = self._by_name.get(a.name)
        if slot is None:
            return None, "not cached (first negotiation, or evicted)"
        e = self._slots[slot]
        if e.signature != a.signature or e.fuse != a.fuse or e.aux[self.rank] != a.aux:
            return -1 - slot, "changed since cached (shape, dtype, reduce op, scale factors or root)"
        return slot, ""

    def words_of(self, slots) -> list[int]:
        words = [0] * self.words
        for s in slots:
            words[s // BITS] |= 1 << (s % BITS)
        return words

    # -- every member, same rows, same answer -----------------------------------------------
    def decide(self, hits: list[list[int]], invalid: list[list[int]], joined: list[bool], now_ms: int) -> Decision:
        """Fold one cycle's bit words (indexed by set rank). While a member has joined, bits decide
        nothing: every member re-announces its bit-waiting ops in full and the table applies
        Join's rules."""
        dropped: list[int] = []
        for s in _bits(_or(invalid, self.words)):
            if s in self._slots:
                self._drop(s)
                dropped.append(s)
        ready, ready_slots, failed, stalled = [], [], [], []
        anyone = _or(hits, self.words)
        if any(joined):
            self._partial.clear()
            return Decision(ready, ready_slots, failed, stalled, dropped, list(_bits(anyone)))
        common = _and(hits, self.words)
        for s in _bits(common):
            e = self._slots.get(s)
            if e is None:
                continue
            self._partial.pop(s, None)
            self._lru.move_to_end(s)
            self.hits += 1
            ready.append(Ready(e.name, e.fuse, list(e.aux), e.signature))
            ready_slots.append(s)
        for s in list(self._partial):
            if not anyone >> s & 1:
                del self._partial[s]
        for s in _bits(anyone & ~common):
            e = self._slots.get(s)
            if e is None:
                continue
            seen = self._partial.setdefault(s, [now_ms, False])
            waited = now_ms - seen[0]
            missing = [i for i in range(self.size) if not hits[i][s // BITS] >> (s % BITS) & 1]
            if waited >= self.stall_fail_ms:
                stalled.append(Stalled(e.name, missing, waited / 1e3))
                failed.append(Failed(e.name, f"stalled for {waited / 1e3:.1f}s", missing))
                self._drop(s)
                dropped.append(s)
            elif waited >= self.stall_warn_ms and not seen[1]:
                seen[1] = True
                stalled.append(Stalled(e.name, missing, waited / 1e3))
        return Decision(ready, ready_slots, failed, stalled, dropped, [])

    def insert(self, ready: list[Ready], joined: list[bool]) -> list[int]:
        """Remember the table's agreed ops (in ready order); returns the slots reused (evicted)."""
        if not self.capacity or any(joined):
            return []
        evicted = []
        for r in ready:
            kind = split_key(r.fuse)[0]
            if kind in UNCACHED or r.name in self._by_name or any(a is None for a in r.aux):
                continue
            if len(self._slots) < self.capacity:
                slot = next(s for s in range(self.capacity) if s not in self._slots)
            else:
                slot = next(iter(self._lru))
                self._drop(slot)
                evicted.append(slot)
            self._slots[slot] = _Slot(r.name, r.signature, r.fuse, list(r.aux))
            self._by_name[r.name] = slot
            self._lru[slot] = None
            self.misses += 1
        return evicted

    def _drop(self, slot: int) -> None:
        e = self._slots.pop(slot)
        del self._by_name[e.name]
        self._lru.pop(slot, None)
        self._partial.pop(slot, None)


def _or(rows: list[list[int]], words: int) -> int:
    out = 0
    for row in rows:
        for k in range(words):
            if row[k]:
                out |= row[k] << (k * BITS)
    return out


def _and(rows: list[list[int]], words: int) -> int:
    out = -1
    for row in rows:
        v = 0
        for k in range(words):
            if row[k]:
                v |= row[k] << (k * BITS)
        out &= v
        if not out:
            return 0
    return max(out, 0)


def _bits(mask: int):
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low
