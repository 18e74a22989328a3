"""The hang watch across nodes: every agent watches its own ranks, and they meet in the job's store.

Each agent keeps a :class:`~launcher.hang.HangWatch` over its local ranks. When any agent's
watch sees no collective finish for ``hang_timeout`` seconds it raises the alarm in the store;
every agent (those that saw nothing too: a rank on another host may be the one behind) then
asks its local ranks for their flight-recorder dumps and stacks and publishes them; the head
(the round's lowest node rank) waits for every member's dumps, at most ``gather_wait``
seconds, and prints ONE report over all ranks: the rank behind, its host, its sequence number
and file:line. Then the round fails (the job ends) or, with ``hang_stop`` off, every agent
starts watching afresh.

Keys, per round ``r`` and per alarm ``g`` of that round (0, 1, ... when the job keeps waiting)::

    hang/<r>/<g>/why            the first agent's reason (compare-and-set: one alarm, one writer)
    hang/<r>/<g>/dumps/<node>   JSON: that node's host, ranks and dumps

Only agents that proved the job secret (and, since protocol 3, the job id) reach these keys
(:mod:`launcher.channel`). Call order: the agent's monitor loop calls :meth:`HangExchange.poll`
every store tick; it blocks only while an alarm is handled (local dumps: ``dump_wait``; the
head also waits ``gather_wait`` for the others). Works for one node too (the head is alone).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time

from .hang import HangWatch, behind, format_report
from .store_client import StoreClient

log = logging.getLogger(__name__)

GATHER_WAIT = 5.0  # seconds the head waits for the other nodes' dumps after its own
MAX_RECORDS = 16  # newest flight-recorder records per rank sent through the store


@dataclasses.dataclass
class HangReport:
    """What an alarm came to on this agent: ``text`` on the head only (None elsewhere)."""

    text: str | None
    behind: list[int]  # global ranks the report names as behind (head only; [] elsewhere)
    why: str


class HangExchange:
    """One agent's side of the cross-node report, for one round (make a new one per round)."""

    def __init__(
        self,
        client: StoreClient,
        watch: HangWatch,
        round_: int,
        node_rank: int,
        members: list[int],
        *,
        gather_wait: float = GATHER_WAIT,
    ):
        self.client, self.watch, self.round, self.node = client, watch, round_, node_rank
        self.members, self.gather_wait = sorted(members), gather_wait
        self.alarm = 0  # the next alarm number this agent has not handled

    @property
    def head(self) -> bool:
        return self.node == self.members[0]

    def _k(self, what: str) -> str:
        return f"hang/{self.round}/{self.alarm}/{what}"

    def poll(self) -> HangReport | None:
        """Once per monitor tick: raise an alarm when this node is stalled, answer anyone's alarm.

        Returns None while nothing happened, else the :class:`HangReport` of the alarm just handled."""
        key = self._k("why")
        stalled = self.watch.stalled()
        if stalled is not None:
            self.client.compare_set(key, "", f"{stalled} (seen by node {self.node})")
        if stalled is None and not self.client.check([key]):
            return None
        why = self.client.get(key, 1.0).decode(errors="replace")
        mine = self.watch.collect()
        for d in mine:
            d["records"] = (d.get("records") or [])[-MAX_RECORDS:]
        self.client.set(self._k(f"dumps/{self.node}"), json.dumps({"host": self.watch.host, "dumps": mine}))
        report = HangReport(None, [], why)
        if self.head:
            report = self._gather(why)
        self.alarm += 1
        self.watch.reset()
        return report

    def _gather(self, why: str) -> HangReport:
        """The head: every member's dumps (waiting up to ``gather_wait``), one report."""
        keys = {n: self._k(f"dumps/{n}") for n in self.members}
        deadline = time.monotonic() + self.gather_wait
        while time.monotonic() < deadline and not self.client.check(list(keys.values())):
            time.sleep(0.05)
        dumps: list[dict] = []
        silent: list[int] = []
        for n, key in keys.items():
            if not self.client.check([key]):
                silent.append(n)
                continue
            try:
                got = json.loads(self.client.get(key, 1.0))
                dumps += [d for d in got["dumps"] if isinstance(d, dict) and "rank" in d]
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("hang report: node %d's dumps are unreadable: %s", n, exc)
                silent.append(n)
        text = format_report(dumps, why)
        if silent:
            hosts = ", ".join(f"node {n} ({self._host(n)})" for n in silent)
            text += f"\n  no dumps from {hosts} within {self.gather_wait:g}s (not watching, or its agent is stuck)"
        return HangReport(text, behind(dumps), why)

    def _host(self, node: int) -> str:
        raw = self.client.get(f"agent/joined/{node}", 1.0) if self.client.check([f"agent/joined/{node}"]) else None
        return raw.decode(errors="replace") if raw else "?"
