"""How the agents of one job agree, through the store, on when a worker group round ends
and which nodes the next round has.

Every agent (one per node) calls, in order, for round ``r`` (0 on the first attempt):

1. :meth:`Rendezvous.join` once, before round 0; :meth:`members` gives round ``r``'s nodes
   (round 0: all ``nnodes``).
2. While its workers run: :meth:`poll` (non-blocking; RUNNING, FAILED, SUCCEEDED or ABORTED).
   A local worker failure, or a peer whose heartbeats stopped: :meth:`mark_failed` with the
   cause. All local workers done: :meth:`mark_succeeded`.
3. After FAILED: stop local workers, :meth:`publish_failures` (possibly an empty list),
   then :meth:`stopped_barrier`: nobody starts round ``r+1`` while a member's round-``r``
   workers still run; a member whose heartbeats stopped counts as lost, not awaited.
   Without a lost node every agent takes the same decision (restart while ``r <
   max_restarts``). With one, the survivors :meth:`propose` round ``r+1``'s members
   (:func:`launcher.membership.next_members`); the first proposal written wins and every
   agent follows it. :meth:`collect_failures` merges the report.
4. At the end :meth:`finish` (records the exit code; the store's host waits for all).

Keys live under ``agent/``; workers' keys under ``worker/attempt_<r>/`` never collide.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import time
from collections.abc import Callable

from .report import Failure
from .store import StoreClient, StoreError


class RoundState(str, enum.Enum):
    """RUNNING -> (FAILED | SUCCEEDED | ABORTED). ABORTED: the launcher called the job off."""

    RUNNING = "running"
    FAILED = "failed"
    SUCCEEDED = "succeeded"
    ABORTED = "aborted"


ABORT_KEY = "agent/abort"


def failure_to_json(f: Failure) -> dict:
    return dataclasses.asdict(f)


def failure_from_json(d: dict) -> Failure:
    fields = {f.name for f in dataclasses.fields(Failure)}
    return Failure(**{k: v for k, v in d.items() if k in fields})


class Rendezvous:
    def __init__(self, client: StoreClient, node_rank: int, nnodes: int, host: str):
        self.client, self.node_rank, self.nnodes, self.host = client, node_rank, nnodes, host
        self._succeeded_round: int | None = None
        self._members: dict[int, list[int]] = {0: list(range(nnodes))}

    def _k(self, r: int, what: str) -> str:
        return f"agent/round/{r}/{what}"

    def join(self) -> None:
        self.client.set(f"agent/joined/{self.node_rank}", self.host)

    def host_of(self, node: int) -> str:
        raw = self.client.get(f"agent/joined/{node}", 1.0) if self.client.check([f"agent/joined/{node}"]) else None
        return raw.decode() if raw else f"node {node}"

    def members(self, r: int) -> list[int]:
        """Round ``r``'s nodes, ascending (round 0: every node; later: the agreed proposal)."""
        if r not in self._members:
            self._members[r] = json.loads(self.client.get(self._k(r, "members")))["nodes"]
        return self._members[r]

    def propose(self, r: int, nodes: list[int], record: str) -> tuple[list[int], str]:
        """Offer round ``r``'s members (``[]``: the job stops); returns the agreed ones and the
        winning proposal's record (a JSON :class:`~launcher.membership.Transition`)."""
        mine = json.dumps({"nodes": nodes, "record": record})
        won = json.loads(self.client.compare_set(self._k(r, "members"), "", mine))
        self._members[r] = won["nodes"]
        return won["nodes"], won["record"]

    def begin(self, r: int) -> None:
        """Round ``r``'s workers start (every member calls it): a host that comes back reads it."""
        self.client.set("agent/current_round", str(r))

    def current_round(self) -> int | None:
        c = self.client
        return int(c.get("agent/current_round", 1.0)) if c.check(["agent/current_round"]) else None

    def rejoining(self) -> bool:
        """True when an earlier agent of this node already joined (this one replaces it)."""
        return self.client.add(f"agent/incarnation/{self.node_rank}", 1) > 1

    def waiting(self, members: list[int]) -> list[int]:
        """Nodes that came back and wait for the next round."""
        return [n for n in range(self.nnodes) if n not in members and self.client.check([f"agent/waiting/{n}"])]

    def admitted(self, nodes: list[int]) -> None:
        """These waiting nodes are in the next round: their requests are answered."""
        for n in nodes:
            self.client.delete_key(f"agent/waiting/{n}")

    def wait_admitted(self, poll: float = 0.1) -> int | None:
        """A host that came back: wait until the job drops this node's earlier self (if it has not
        yet), ask to join, and block until a round includes it. Returns that round, or None when
        the job ended or was aborted first."""
        c, me = self.client, self.node_rank
        requested = False
        while True:
            if c.check([ABORT_KEY]) or c.check(["agent/final_round"]):
                return None
            r = self.current_round() or 0
            for cand in (r, r + 1) if requested else ():
                if c.check([self._k(cand, "members")]) and me in self.members(cand):
                    c.delete_key(f"agent/waiting/{me}")
                    return cand
            if not requested and me not in self.members(r):
                c.set(f"agent/waiting/{me}", self.host)
                requested = True
            time.sleep(poll)

    def record_transition(self, record: str) -> None:
        self.client.append("agent/transitions", record + "\n")

    def transitions(self) -> list[str]:
        if not self.client.check(["agent/transitions"]):
            return []
        return [line for line in self.client.get("agent/transitions", 1.0).decode().splitlines() if line]

    def poll(self, r: int) -> RoundState:
        c = self.client
        if c.check([ABORT_KEY]):
            return RoundState.ABORTED
        if c.check([self._k(r, "failed")]):
            return RoundState.FAILED
        if self._succeeded_round == r and c.add(self._k(r, "succeeded"), 0) >= len(self.members(r)):
            return RoundState.SUCCEEDED
        return RoundState.RUNNING

    def mark_failed(self, r: int, cause: str = "a worker failed") -> None:
        """Round ``r`` ends for every agent; the first cause recorded is the round's."""
        self.client.compare_set(self._k(r, "cause"), "", f"{cause} (seen by {self.host})")
        self.client.add(self._k(r, "failed"), 1)

    def cause(self, r: int) -> str:
        return self.client.get(self._k(r, "cause"), 1.0).decode() if self.client.check([self._k(r, "cause")]) else ""

    def mark_succeeded(self, r: int) -> None:
        if self._succeeded_round != r:
            self._succeeded_round = r
            self.client.add(self._k(r, "succeeded"), 1)

    def publish_failures(self, r: int, failures: list[Failure]) -> None:
        self.client.set(self._k(r, f"failures/{self.node_rank}"), json.dumps([failure_to_json(f) for f in failures]))

    def stopped_barrier(self, r: int, timeout: float, lost: Callable[[], list[int]]) -> tuple[bool, list[int]]:
        """Block until every member of round ``r`` stopped its workers or is ``lost()`` (heartbeats
        stopped). Returns (done, lost members); done is False after ``timeout`` or an abort."""
        members = self.members(r)
        self.client.set(self._k(r, f"stopped/{self.node_rank}"), "1")
        deadline = time.monotonic() + timeout
        while True:
            gone = [n for n in lost() if n in members]
            waiting = [n for n in members if n not in gone and not self.client.check([self._k(r, f"stopped/{n}")])]
            if not waiting:
                return True, gone
            if time.monotonic() > deadline or self.client.check([ABORT_KEY]):
                return False, gone
            time.sleep(0.05)

    def collect_failures(self, r: int, timeout: float = 5.0, skip: list[int] = ()) -> list[Failure]:
        out = []
        for n in self.members(r):
            if n in skip:
                continue  # a lost node never publishes; its workers died with it
            try:
                raw = self.client.get(self._k(r, f"failures/{n}"), timeout if n != self.node_rank else 1.0)
            except StoreError:
                continue  # that agent is gone; its failures are lost, the others still tell the story
            out += [failure_from_json(d) for d in json.loads(raw)]
        return out

    def finish(self, r: int, exit_code: int) -> None:
        self.client.set("agent/final_round", str(r))
        self.client.set(f"agent/result/{self.node_rank}", str(exit_code))
        self.client.add("agent/exited", 1)

    def abort(self, reason: str) -> None:
        try:
            self.client.compare_set(ABORT_KEY, "", f"{reason} (from {self.host})")
        except StoreError:
            pass


def wait_exited(client: StoreClient, nodes: list[int], timeout: float, lost: Callable[[], list[int]]) -> None:
    """The store's host: wait until every node in ``nodes`` recorded its result or is ``lost()``
    (bounded), then close."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        gone = set(lost())
        if all(n in gone or client.check([f"agent/result/{n}"]) for n in nodes) or client.check([ABORT_KEY]):
            return
        time.sleep(0.05)
