"""Where everything lives in a group's ``shm`` segment (after ``segment``'s 4 KiB header).

In order, each region page-aligned:

* control rows: ``ROW_INT64S`` int64 per rank (see the ``ROW_*`` and ``RECORD_*`` indices):
  the step counter, the step of a published mismatch, a "sleeping" flag for the waiting
  strategy, then two op records (digest, bytes, alloc id, offset; the second right after the
  first), one per op parity, so a rank may publish op k+1 while a slow peer still reads op k's record,
  then the abort poison;
* fingerprints: one encoded :class:`~collectives.fingerprint.Fingerprint` per rank,
  written only on a mismatch so every rank can name both sides;
* pair records: per ordered (src, dst) pair, 512 bytes of mailbox counters and slot records;
* staging: per rank two slots of ``STAGING_SLOT_BYTES`` (ops alternate slots, so one sync
  per op suffices for small messages);
* mailboxes: per ordered pair a ring of ``MAILBOX_SLOTS`` chunks.

Sizes come from the environment once, at import: ``DISTTRAIN_SHM_SMALL_BYTES`` (the
latency-path limit, 128 KiB) and ``DISTTRAIN_SHM_CHUNK_BYTES`` (4 MiB). Every rank of a
job must see the same values.
"""

from __future__ import annotations

import dataclasses
import os

from ...fingerprint import ENCODED_SIZE
from .segment import HEADER

SMALL_BYTES = int(os.environ.get("DISTTRAIN_SHM_SMALL_BYTES", 128 << 10))
STAGING_SLOT_BYTES = max(64 << 10, int(os.environ.get("DISTTRAIN_SHM_CHUNK_BYTES", 4 << 20)) // 4096 * 4096)
MAILBOX_SLOTS = 8
PAIR_BYTES = 512

ROW_INT64S = 16
ROW_STEP, ROW_ERROR_STEP, ROW_SLEEPING = 0, 1, 2
ROW_ABORTED = 11  # non-zero: this rank aborted the group (a poison its peers' waits see and raise on)
# First int64 of the op record, by parity. Rows are 128-byte aligned, so both records' digests (their first
# field, the one every op's check reads from every peer) share the step counter's 64-byte cache line: a check
# costs no cache miss beyond the one the wait already took.
RECORD_BASE = (3, 7)
RECORD_DIGEST, RECORD_NBYTES, RECORD_ALLOC, RECORD_OFFSET = 0, 1, 2, 3


def align(n: int, a: int = 4096) -> int:
    return (n + a - 1) // a * a


def mailbox_bytes(world: int) -> int:
    """Mailbox chunk per ordered pair: the rings are world^2 in number, so shrink them for big groups."""
    return 256 << 10 if world <= 8 else 32 << 10


@dataclasses.dataclass(frozen=True)
class Layout:
    """Byte offsets of each region in a segment for ``world`` ranks."""

    world: int
    fingerprints: int
    pairs: int
    staging: int
    mailboxes: int
    mailbox_bytes: int
    total: int

    @classmethod
    def for_world(cls, world: int) -> Layout:
        fingerprints = align(HEADER + world * ROW_INT64S * 8)
        pairs = align(fingerprints + world * ENCODED_SIZE)
        staging = align(pairs + PAIR_BYTES * world * world)
        mailboxes = staging + world * 2 * STAGING_SLOT_BYTES
        mb = mailbox_bytes(world)
        return cls(world, fingerprints, pairs, staging, mailboxes, mb, mailboxes + world * world * MAILBOX_SLOTS * mb)

    def row(self, rank: int) -> int:
        """int64 index of ``rank``'s control row."""
        return (HEADER + rank * ROW_INT64S * 8) // 8

    def pair(self, src: int, dst: int) -> int:
        """int64 index of the (src, dst) pair record."""
        return (self.pairs + PAIR_BYTES * (src * self.world + dst)) // 8

    def mailbox(self, src: int, dst: int, slot: int) -> int:
        """Byte offset of chunk ``slot`` of the (src, dst) ring."""
        return self.mailboxes + ((src * self.world + dst) * MAILBOX_SLOTS + slot) * self.mailbox_bytes
