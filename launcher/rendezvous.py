"""How the agents of one job agree, through the store, on when a worker group round ends.

Every agent (one per node) calls, in order, for round ``r`` (0 on the first attempt):

1. :meth:`Rendezvous.join` once, before round 0.
2. While its workers run: :meth:`poll` (non-blocking; RUNNING, FAILED, SUCCEEDED or ABORTED).
   A local worker failure: :meth:`mark_failed`. All local workers done: :meth:`mark_succeeded`.
3. After FAILED: stop local workers, :meth:`publish_failures` (possibly an empty list),
   then :meth:`stopped_barrier`: nobody starts round ``r+1`` while a peer's round-``r``
   workers still run. Every agent takes the same decision (restart while ``r <
   max_restarts``), so no leader is needed; :meth:`collect_failures` merges the report.
4. At the end :meth:`finish` (records the exit code; the store's host waits for all).

Keys live under ``agent/``; workers' keys under ``worker/attempt_<r>/`` never collide.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import time

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

    def _k(self, r: int, what: str) -> str:
        return f"agent/round/{r}/{what}"

    def join(self) -> None:
        self.client.set(f"agent/joined/{self.node_rank}", self.host)

    def poll(self, r: int) -> RoundState:
        c = self.client
        if c.check([ABORT_KEY]):
            return RoundState.ABORTED
        if c.check([self._k(r, "failed")]):
            return RoundState.FAILED
        if self._succeeded_round == r and c.add(self._k(r, "succeeded"), 0) >= self.nnodes:
            return RoundState.SUCCEEDED
        return RoundState.RUNNING

    def mark_failed(self, r: int) -> None:
        self.client.add(self._k(r, "failed"), 1)

    def mark_succeeded(self, r: int) -> None:
        if self._succeeded_round != r:
            self._succeeded_round = r
            self.client.add(self._k(r, "succeeded"), 1)

    def publish_failures(self, r: int, failures: list[Failure]) -> None:
        self.client.set(self._k(r, f"failures/{self.node_rank}"), json.dumps([failure_to_json(f) for f in failures]))

    def stopped_barrier(self, r: int, timeout: float) -> bool:
        """Block until every agent stopped its round-``r`` workers; False after ``timeout``."""
        self.client.add(self._k(r, "stopped"), 1)
        deadline = time.monotonic() + timeout
        while self.client.add(self._k(r, "stopped"), 0) < self.nnodes:
            if time.monotonic() > deadline or self.client.check([ABORT_KEY]):
                return False
            time.sleep(0.05)
        return True

    def collect_failures(self, r: int, timeout: float = 5.0) -> list[Failure]:
        out = []
        for n in range(self.nnodes):
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


def wait_exited(client: StoreClient, nnodes: int, timeout: float) -> None:
    """The store's host: wait until every agent recorded its result (bounded), then close."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.add("agent/exited", 0) >= nnodes or client.check([ABORT_KEY]):
            return
        time.sleep(0.05)
