"""Which hosts are in the job: heartbeats through the store, the quorum rule, the transition log.

Every agent of a multi-node job runs one :class:`Heartbeat` thread (started by
``LocalAgent.run`` after it joined). The thread has its own store connection, so a main
loop busy stopping workers never delays a beat. Each beat adds 1 to ``agent/hb/<node>``
and reads the counters of the nodes being watched. A node whose counter has not moved
for ``timeout`` seconds, as timed on this host's monotonic clock (no clock comparison
across hosts), is lost. When this host's own beats have not gone through for ``timeout``
seconds, the store is unreachable from here: this host is cut off (the store's host
died, or a partition left this host on the side without the store) and it stops.

After a round ends with a host lost, the survivors apply :func:`next_members`. A quorum
is at least half of the round's members, counted on the side that still reaches the
store; that side is the only one that can write the next membership, so there is never
a second job. The new membership also needs at least ``NodesRange.min`` hosts.
Each change becomes a :class:`Transition`; the list goes in the final report.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable

from .errors import LaunchConfigError
from .store import StoreClient, StoreError

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 0.5
HEARTBEAT_TIMEOUT = 5.0


@dataclasses.dataclass(frozen=True)
class NodesRange:
    """torchrun's ``--nnodes MIN:MAX``; a plain ``N`` is ``N:N`` (no shrinking)."""

    min: int
    max: int

    @classmethod
    def parse(cls, text: str | int, what: str = "--nnodes") -> NodesRange:
        s = str(text).strip()
        lo, sep, hi = s.partition(":")
        try:
            lo_n, hi_n = int(lo), int(hi if sep else lo)
        except ValueError:
            raise LaunchConfigError(f"{what} {s!r}: expected N or MIN:MAX, e.g. 2 or 1:2") from None
        if not 1 <= lo_n <= hi_n:
            raise LaunchConfigError(f"{what} {s!r}: need 1 <= MIN <= MAX")
        return cls(lo_n, hi_n)

    @property
    def elastic(self) -> bool:
        return self.min < self.max

    def __str__(self) -> str:
        return f"{self.min}:{self.max}" if self.elastic else str(self.max)


def next_members(members: list[int], lost: list[int], joined: list[int], nodes: NodesRange) -> tuple[list[int], str]:
    """The next round's nodes after ``lost`` left and ``joined`` came; ``([], why)`` when the job must stop.

    Pure: every survivor computes it from what it read in the store; the first to write wins.
    """
    alive = [n for n in members if n not in lost]
    if 2 * len(alive) < len(members):
        return [], (
            f"no quorum: {len(alive)} of the round's {len(members)} hosts remain (at least half must); "
            "stopping rather than splitting the job"
        )
    new = sorted(alive + [n for n in joined if n not in alive][: max(0, nodes.max - len(alive))])
    if len(new) < nodes.min:
        return [], f"{len(new)} host(s) left, fewer than the minimum of {nodes.min} (--nnodes {nodes})"
    return new, ""


@dataclasses.dataclass
class Transition:
    """One change of the worker group: a restart at the same size, a shrink or a grow."""

    round: int  # the round that starts
    cause: str
    lost: list[str]  # hosts
    joined: list[str]
    world_before: int
    world_after: int
    detected_at: float  # wall clock, when the first agent noticed
    seconds: float = 0.0  # from detection to the new round's workers started (0 when the job stopped)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> Transition:
        return cls(**json.loads(raw))

    def describe(self) -> str:
        moved = [f"lost {', '.join(self.lost)}"] if self.lost else []
        moved += [f"joined {', '.join(self.joined)}"] if self.joined else []
        if not self.world_after:
            return f"after round {self.round - 1}: {self.cause}; {'; '.join(moved)}; the job stopped"
        return (
            f"round {self.round}: {self.cause}; {'; '.join(moved) or 'same hosts'}; world "
            f"{self.world_before} -> {self.world_after}; {self.seconds:.1f}s"
        )


def format_transitions(transitions: list[Transition], job_id: str = "") -> str:
    if not transitions:
        return ""
    lines = [f"disttrain: job {job_id}: {len(transitions)} membership transition(s)"]
    lines += [f"  {t.describe()}" for t in transitions]
    return "\n".join(lines)


class Heartbeat(threading.Thread):
    """This node's beats and its view of its peers'. Started once per agent; a daemon thread."""

    def __init__(
        self,
        address: str,
        secret: str,
        node_rank: int,
        *,
        interval: float | None = None,  # default: HEARTBEAT_INTERVAL, at most a quarter of the timeout
        timeout: float = HEARTBEAT_TIMEOUT,
        connect_timeout: float = 30.0,
        job: str = "",  # the job id the store's handshake checks
    ):
        super().__init__(name="heartbeat", daemon=True)
        self.node_rank, self.timeout = node_rank, timeout
        self.interval = interval if interval is not None else min(HEARTBEAT_INTERVAL, timeout / 4)
        self._client = StoreClient(address, secret, timeout=timeout, connect_timeout=connect_timeout, job=job)
        self._lock = threading.Lock()
        self._watched: set[int] = set()
        self._seen: dict[int, tuple[int, float]] = {}  # node -> (counter, monotonic time it last moved)
        self._last_ok = time.monotonic()
        self._stop = threading.Event()
        self.on_silent: Callable[[], None] | None = None  # called once, from a watchdog thread, when cut off

    def watch(self, nodes: list[int]) -> None:
        """Watch these nodes (the current round's members); a node starts with a full timeout."""
        now = time.monotonic()
        with self._lock:
            keep = self._watched
            self._watched = {n for n in nodes if n != self.node_rank}
            self._seen = {n: self._seen[n] if n in keep else (-1, now) for n in self._watched}

    def lost(self) -> list[int]:
        """Watched nodes whose beats stopped for ``timeout`` seconds (a node that never beat is not
        lost: it is still starting, and the join timeout covers it)."""
        with self._lock:  # judged between our own reads: a stalled observer accuses nobody
            last = self._last_ok
            return sorted(n for n, (c, moved) in self._seen.items() if c > 0 and last - moved > self.timeout)

    def store_reachable(self) -> bool:
        return time.monotonic() - self._last_ok <= self.timeout

    def silent_for(self) -> float:
        return time.monotonic() - self._last_ok

    def _watch_silence(self) -> None:
        """A second thread: the beating one may sit in a store call on a cut link for a minute."""
        while not self._stop.wait(self.interval):
            if not self.store_reachable():
                if self.on_silent is not None:
                    self.on_silent()
                return

    def run(self) -> None:
        threading.Thread(target=self._watch_silence, name="heartbeat-watchdog", daemon=True).start()
        key = f"agent/hb/{self.node_rank}"
        while not self._stop.is_set():
            try:
                self._client.add(key, 1)
                with self._lock:
                    watched = sorted(self._watched)
                counts = {n: self._client.add(f"agent/hb/{n}", 0) for n in watched}
                now = time.monotonic()
                with self._lock:
                    self._last_ok = now
                    for n, c in counts.items():
                        if n in self._seen and self._seen[n][0] != c:
                            self._seen[n] = (c, now)
            except StoreError as exc:
                log.debug("heartbeat of node %d failed: %s", self.node_rank, exc)
                self._stop.wait(self.interval)
                try:  # a fresh connection: the old one may be wedged behind a cut link
                    self._client.close()
                    self._client = StoreClient(
                        self._client.address,
                        self._client.secret,
                        timeout=self.timeout,
                        connect_timeout=self.timeout,
                        job=self._client.job,
                    )
                except StoreError:
                    pass
                continue
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._client.close()
