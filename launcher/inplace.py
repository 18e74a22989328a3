"""Changing the world without restarting the survivors' workers (``fault_tolerance.recover: in_place``).

Both sides meet in the job's store, in the namespace of the round's workers (``worker/attempt_<r>/``,
the one :func:`launcher.store_client.connect_from_env` gives them), so no new door is opened:

* worker, at the start of round ``r``: :func:`declare` ("I can change world in place": its
  communicator can abort and be rebuilt); a worker that cannot (mpi) does not declare, and its agent
  takes the restart path for it;
* agent, when round ``r`` fails (:class:`HandOver`): if every local worker is alive and declared,
  :meth:`HandOver.end` writes the cause under ``ended`` (each worker's :class:`RoundWatch` aborts its
  communicator), the agents agree on round ``r+1`` as for a restart, and :meth:`HandOver.move` writes
  each kept worker's new place under ``next/<old rank>``; otherwise the agent stops its workers as
  before and :meth:`HandOver.refuse` writes ``next/stop`` so a worker waiting in place exits;
* worker: :func:`wait_next` returns its new environment (rank, world, attempt, replica stores), or
  None when it must exit (``stop``, or nothing within its timeout).

Never imports torch, collectives or disttrain (the worker side is called by ``disttrain.fault``).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable

from .store import StoreClient
from .store_client import connect_from_env

log = logging.getLogger(__name__)


def _ns(attempt: int) -> str:
    return f"worker/attempt_{attempt}/"


# -- agent side ----------------------------------------------------------------------------------
class HandOver:
    """One agent's side of in-place round changes (the agent calls it from its round loop)."""

    def __init__(self, client: StoreClient):
        self.client = client

    def eligible(self, attempt: int, ranks: list[int], alive: bool) -> bool:
        """True when every local worker (``ranks``) of round ``attempt`` declared and ``alive``."""
        c, ns = self.client, _ns(attempt)
        return alive and bool(ranks) and all(c.check([f"{ns}inplace/{r}"]) for r in ranks)

    def end(self, attempt: int, cause: str, lost: list[str]) -> None:
        """Round ``attempt`` is over (``lost``: the ranks gone, as rank@host): the kept workers abort the
        collective in flight."""
        text = (cause or "the round ended") + (f"; lost {', '.join(lost)}" if lost else "")
        self.client.compare_set(f"{_ns(attempt)}ended", "", text)

    def move(self, attempt: int, old_rank: int, env: dict[str, str]) -> None:
        """The kept worker of ``old_rank`` (round ``attempt``) takes the next round's ``env``."""
        self.client.set(f"{_ns(attempt)}next/{old_rank}", json.dumps(env))

    def refuse(self, attempt: int, why: str) -> None:
        """This agent's kept workers of round ``attempt`` must exit (it restarts them, or the job stops)."""
        self.client.compare_set(f"{_ns(attempt)}next/stop", "", why)


def lost_ranks(members: list[int], lost: list[int], nproc: int, host_of: Callable[[int], str]) -> list[str]:
    """rank@host of every worker of the ``lost`` nodes in a round of ``members`` (ranks follow their order)."""
    return [f"rank {members.index(m) * nproc + i}@{host_of(m)}" for m in lost for i in range(nproc)]


# -- worker side ---------------------------------------------------------------------------------
def _client(timeout: float) -> StoreClient | None:
    return connect_from_env(timeout)  # this attempt's namespace


def attempt() -> int:
    return int(os.environ.get("DISTTRAIN_RESTART_COUNT", "0"))


def declare(rank: int, timeout: float = 60.0) -> bool:
    """Worker, at the start of its round: it can change world in place. False without our launcher."""
    c = _client(timeout)
    if c is None:
        return False
    try:
        c.set(f"inplace/{rank}", "1")
    finally:
        c.close()
    return True


def wait_next(rank: int, timeout: float, poll: float = 0.05) -> tuple[dict[str, str] | None, str]:
    """Worker, after its round ended (or a collective failed): block until its agent says where it goes
    next. Returns (the new environment, the round's cause), or (None, why) when it must exit instead."""
    c = _client(timeout)
    if c is None:
        return None, "not started by disttrain's launcher"
    try:
        deadline = time.monotonic() + timeout
        mine = f"next/{rank}"
        while time.monotonic() < deadline:
            if c.check(["next/stop"]):
                return None, c.get("next/stop").decode()
            if c.check([mine]):
                cause = c.get("ended").decode() if c.check(["ended"]) else ""
                return json.loads(c.get(mine)), cause
            time.sleep(poll)
        return None, f"no word from the agent within {timeout:g}s"
    finally:
        c.close()


class RoundWatch:
    """Worker: a thread that calls ``on_end(cause)`` once when the agent ends this round (``ended``),
    so a rank blocked in a collective or busy computing leaves the step. ``stop()`` before a new round."""

    def __init__(self, on_end: Callable[[str], None], poll: float = 0.1, timeout: float = 60.0):
        self._on_end, self._poll = on_end, poll
        self._client = _client(timeout)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="round-watch")
        if self._client is not None:
            self._thread.start()

    def _run(self) -> None:
        c = self._client
        try:
            while not self._stop.wait(self._poll):
                if c.check(["ended"]):
                    self._on_end(c.get("ended").decode())
                    return
        except Exception as exc:  # the store went away: the agent's death takes this process down
            log.debug("round watch stopped: %s", exc)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
        if self._client is not None:
            self._client.close()
