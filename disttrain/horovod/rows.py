"""One cycle's rows, exchanged so that a steady step costs a few hundred bytes and one call.

Every cycle each member of a process set contributes a row (see ``negotiation``): the header
(flags, announcement count, clock, free result buffers), the response cache's hit and invalid
words (see ``cache``), then ``count`` full announcements. A steady training step announces
nothing in full (its ops hit the cache), so the rows' heads go first, in one allgather of
``HEADER + 2 * words`` int64 whatever ``DISTTRAIN_HVD_SLOTS`` is. Only when some member
announces does a second allgather carry the announcements, sized by the largest count. Every
member reads that count from the same heads, so every member makes the same second call (or
none): the calls never differ between members, whatever each announced.

Before, every cycle allgathered the whole fixed row (announcement slots included, used or
not): 4.4 KB per member at the default 128 slots, against 304 bytes for the heads.
"""

from __future__ import annotations

import torch

from collectives import Communicator

from .negotiation import HEADER, SLOT


class RowExchange:
    """One per process set and member; used by the thread holding the set's cycle token."""

    def __init__(self, comm: Communicator | None, size: int, head_words: int, slots: int):
        self.comm, self.size, self.head_words = comm, size, head_words
        self._heads: torch.Tensor | None = None  # buffers for the set's lifetime, made at the first cycle
        self._head = self._slots = self._mine = None
        self._slot_words = SLOT * slots
        self.calls = self.bytes = 0  # exchanges, and the payload bytes this member sent in them (tests read them)

    def exchange(self, head: list[int], announced: list[int]) -> tuple[list[list[int]], list[list[int]]]:
        """Every member, same cycle: ``head`` is this member's ``HEADER`` words and cache words
        (``head[1]`` counts its announcements), ``announced`` their ``SLOT`` words each. Returns
        (every member's head, every member's row: header words then announcements), by set rank."""
        if self.size == 1 or self.comm is None:
            return [head], [head[:HEADER] + announced]
        if self._heads is None:
            self._heads = torch.zeros(self.size, self.head_words, dtype=torch.int64)
            self._head = torch.zeros(self.head_words, dtype=torch.int64)
            self._slots = torch.zeros(self.size, self._slot_words, dtype=torch.int64)
            self._mine = torch.zeros(self._slot_words, dtype=torch.int64)
        self._head.copy_(torch.tensor(head, dtype=torch.int64))
        self.comm.allgather(list(self._heads.unbind(0)), self._head)
        heads = self._heads.tolist()
        self.calls += 1
        self.bytes += 8 * self.head_words
        n = SLOT * max(h[1] for h in heads)
        if not n:
            return heads, [h[:HEADER] for h in heads]
        if announced:
            self._mine[: len(announced)] = torch.tensor(announced, dtype=torch.int64)
        self.comm.allgather([self._slots[i, :n] for i in range(self.size)], self._mine[:n])
        self.bytes += 8 * n
        return heads, [
            h[:HEADER] + (self._slots[i, : SLOT * h[1]].tolist() if h[1] else []) for i, h in enumerate(heads)
        ]
