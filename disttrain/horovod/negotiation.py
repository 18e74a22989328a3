"""The agreement: which named ops every member of a process set has submitted, and in what order.

Horovod matches ops by *name*, not by call order: ranks may submit them in any order, from any
thread, and a rank-dependent branch only has to submit the same names in the end. Horovod's
coordinator gathers every rank's requests each cycle and answers with the list of tensors all
ranks asked for. We do the same without a coordinator: every cycle each member contributes one
row of int64 on the set's control communicator (its head in one allgather, its announcements in
a second only when some member has any: see ``rows``), so every member holds the same rows and
:meth:`Table.absorb` (pure, deterministic) reaches the same verdict everywhere: one small
collective per steady cycle, however many ops it agrees on.

A row is ``HEADER`` int64 (flags, number of announcements, the rank's clock in ms) followed by
up to ``slots`` announcements of four int64 each (see ``wire``): name digest, signature digest,
fusion key, aux. A rank announces each op once; more than ``slots`` new ops spill into the next
cycles. The table remembers, per name, which ranks announced it with which signature. A name
is *ready* once every member that has not joined announced it; ready names run in the order in
which the table first saw them (identical on every member). Differing signatures make an error
on every member (the engine then exchanges readable descriptions, see :func:`mismatch_message`);
a name that some members still lack after the stall time is reported (which ranks lack which
names) and, after the shutdown time, fails where it was submitted, so nothing hangs.
"""

from __future__ import annotations

import dataclasses
import json
import logging

from .wire import JOINABLE, Kind, split_key

log = logging.getLogger(__name__)
HEADER = 4  # flags, announcement count, clock (ms), free result buffers (see ``pool``)
SLOT = 4  # name digest, signature digest, fusion key, aux
JOINED, SHUTDOWN, REMOVING = 1, 2, 4  # row flags


@dataclasses.dataclass
class Announcement:
    name: int  # digest of the op's name
    signature: int
    fuse: int
    aux: int


@dataclasses.dataclass
class Ready:
    """An op every active member submitted with one signature: run it now, in list order."""

    name: int
    fuse: int
    aux: list[int | None]  # per set rank (None: this rank joined and contributes zeros)
    signature: int = 0

    @property
    def kind(self) -> Kind:
        return split_key(self.fuse)[0]


@dataclasses.dataclass
class Failed:
    """An op that fails on every member that submitted it."""

    name: int
    message: str | None  # None: signatures differ; the engine builds the message from descriptions
    missing: list[int] | None = None  # stalled: the set ranks that never submitted it


@dataclasses.dataclass
class Stalled:
    name: int
    missing: list[int]  # set ranks that have not submitted it
    waited_s: float


@dataclasses.dataclass
class Verdict:
    ready: list[Ready]
    failed: list[Failed]
    stalled: list[Stalled]  # past the warning time (reported once per name)
    joined: list[bool]
    join_done: int | None  # set rank that joined last, once every member has joined
    shutdown: bool  # some member shut down: every member stops (as in Horovod)
    removed: bool  # every member removed the set: its thread stops


@dataclasses.dataclass
class _Entry:
    seen: int  # order of first sight: the agreed run order
    since_ms: int  # agreed clock when first seen
    by_rank: dict[int, Announcement]
    warned: bool = False


class Table:
    """What the members announced so far. Identical on every member after each ``absorb``."""

    def __init__(self, size: int, *, stall_warn_s: float, stall_fail_s: float):
        self.size = size
        self.stall_warn_ms, self.stall_fail_ms = stall_warn_s * 1e3, stall_fail_s * 1e3
        self._entries: dict[int, _Entry] = {}
        self._order = 0
        self._joined_at: list[int | None] = [None] * size
        self._cycle = 0

    def pending(self) -> int:
        return len(self._entries)

    def absorb(self, rows: list[list[int]]) -> Verdict:
        """Fold one cycle's rows (indexed by set rank) into the table and decide."""
        self._cycle += 1
        now = rows[0][2]  # set rank 0's clock is the agreed clock
        shutdown = any(r[0] & SHUTDOWN for r in rows)
        removed = all(r[0] & REMOVING for r in rows)
        joined = [bool(r[0] & JOINED) for r in rows]
        for i, j in enumerate(joined):
            if j and self._joined_at[i] is None:
                self._joined_at[i] = self._cycle
            elif not j:
                self._joined_at[i] = None
        for i, row in enumerate(rows):
            for k in range(row[1]):
                base = HEADER + SLOT * k
                a = Announcement(*row[base : base + SLOT])
                e = self._entries.get(a.name)
                if e is None:
                    e = self._entries[a.name] = _Entry(self._order, now, {})
                    self._order += 1
                e.by_rank[i] = a
        active = [i for i in range(self.size) if not joined[i]]
        ready: list[Ready] = []
        failed: list[Failed] = []
        stalled: list[Stalled] = []
        for name, e in sorted(self._entries.items(), key=lambda kv: kv[1].seen):
            if active and all(i in e.by_rank for i in active):
                del self._entries[name]
                first = e.by_rank[min(e.by_rank)]
                if len({a.signature for a in e.by_rank.values()}) > 1:
                    failed.append(Failed(name, None))
                    continue
                kind = split_key(first.fuse)[0]
                if any(joined) and kind not in JOINABLE:
                    failed.append(Failed(name, f"{kind.name.title()} is not supported with Join at this time."))
                    continue
                ready.append(
                    Ready(
                        name,
                        first.fuse,
                        [e.by_rank[i].aux if i in e.by_rank else None for i in range(self.size)],
                        first.signature,
                    )
                )
                continue
            if not active:  # every member joined while this name waited for someone
                del self._entries[name]
                failed.append(Failed(name, "every rank called join() before this op was submitted everywhere"))
                continue
            waited = now - e.since_ms
            missing = [i for i in active if i not in e.by_rank]
            if waited >= self.stall_fail_ms:
                del self._entries[name]
                stalled.append(Stalled(name, missing, waited / 1e3))
                failed.append(Failed(name, f"stalled for {waited / 1e3:.1f}s", missing))
            elif waited >= self.stall_warn_ms and not e.warned:
                e.warned = True
                stalled.append(Stalled(name, missing, waited / 1e3))
        join_done = None
        if all(joined):
            last = max(self._joined_at)  # type: ignore[type-var]
            join_done = max(i for i in range(self.size) if self._joined_at[i] == last)
            self._joined_at = [None] * self.size
        return Verdict(ready, failed, stalled, joined, join_done, shutdown, removed)


def row_of(flags: int, clock_ms: int, outgoing: list[Announcement], slots: int, free: int = 0) -> list[int]:
    row = [flags, len(outgoing), clock_ms, free]
    for a in outgoing:
        row += [a.name, a.signature, a.fuse, a.aux]
    return row + [0] * (SLOT * (slots - len(outgoing)))


# -- readable mismatch reports, in Horovod's words ----------------------------------------------
def describe(kind: Kind, dtype: str, shape, reduce_op: str = "", scales=(1.0, 1.0), root: int = -1) -> str:
    return json.dumps(
        {"kind": kind.name, "dtype": dtype, "shape": list(shape), "op": reduce_op, "scales": list(scales), "root": root}
    )


def mismatch_message(descs: dict[int, dict], global_ranks: list[int]) -> str:
    """Horovod's message for the first field that differs (dtype, op, shape, scales, reduce op,
    root), followed by every rank's view of the op."""
    ranks = sorted(descs)
    first = descs[ranks[0]]
    msg = ""
    for r in ranks[1:]:
        d = descs[r]
        if d["dtype"] != first["dtype"]:
            msg = f"Mismatched data types: One rank had type {first['dtype']}, but another rank had type {d['dtype']}."
        elif d["kind"] != first["kind"]:
            msg = f"Mismatched operations: One rank did an {first['kind']}, but another rank did an {d['kind']}."
        elif first["kind"] in ("ALLGATHER", "ALLTOALL") and len(d["shape"]) != len(first["shape"]):
            msg = (
                f"Mismatched {first['kind']} tensor shapes: One rank sent a tensor of rank {len(first['shape'])}, "
                f"but another rank sent a tensor of rank {len(d['shape'])}."
            )
        elif first["kind"] in ("ALLGATHER", "ALLTOALL") and d["shape"][1:] != first["shape"][1:]:
            dim = next(k for k in range(1, len(d["shape"])) if d["shape"][k] != first["shape"][k])
            msg = (
                f"Mismatched {first['kind']} tensor shapes: One rank sent a tensor with dimension {dim} equal to "
                f"{first['shape'][dim]}, but another rank sent a tensor with dimension {dim} equal to {d['shape'][dim]}."
            )
        elif first["kind"] not in ("ALLGATHER", "ALLTOALL") and d["shape"] != first["shape"]:
            msg = (
                f"Mismatched {first['kind']} tensor shapes: One rank sent a tensor of shape {first['shape']}, "
                f"but another rank sent a tensor of shape {d['shape']}."
            )
        elif d["scales"] != first["scales"]:
            msg = (
                f"Mismatched prescale and/or postscale factors: One rank sent factors {tuple(first['scales'])}, "
                f"but another rank sent factors {tuple(d['scales'])}."
            )
        elif d["op"] != first["op"]:
            msg = (
                f"Mismatched reduction operation: One rank sent reduction op {first['op']}, "
                f"but another rank sent reduction op {d['op']}."
            )
        elif d["root"] != first["root"]:
            msg = (
                f"Mismatched {first['kind']} root ranks: One rank specified root rank {first['root']}, "
                f"but another rank specified root rank {d['root']}."
            )
        if msg:
            break
    sides = "; ".join(
        f"rank {global_ranks[r]}: {descs[r]['kind'].lower()} {descs[r]['dtype']} shape {descs[r]['shape']}"
        + (f" op {descs[r]['op']}" if descs[r]["op"] else "")
        + (f" root {descs[r]['root']}" if descs[r]["root"] >= 0 else "")
        for r in ranks
    )
    return f"{msg or 'Mismatched op'} ({sides})"
