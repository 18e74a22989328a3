"""Stragglers: which rank arrives last at each step's collectives, from the flight recorder.

A rank's section times cannot say who is slow (under DDP every rank's backward ends together: the
fast ones wait inside it); arrival times can. At each step end every rank notes when it entered
the step's first collective on the world group (``collectives.flight_recorder``: the start time
of the earliest record since the step's work began). At each metrics line one allgather of those
times gives, per step, each rank's lag behind the first to arrive; a step whose last rank is
later than ``log.straggler_threshold_s`` is attributed to that rank. The line reports the rank
attributed most often when that is at least half the window's steps (``straggler_rank``, -1
otherwise), its mean lag and its host.

Arrival times are wall-clock times (``time.time``): exact between ranks of one host, shifted by
the clocks' offset between hosts.
"""

from __future__ import annotations

import time

import torch

from collectives import Communicator
from collectives.flight_recorder import RECORDER

from .metrics import allgather_bytes


class Stragglers:
    """Per rank, collective calls at the same points on every rank (``reduce`` at metrics lines)."""

    def __init__(self, comm: Communicator, threshold_s: float):
        self.comm, self.threshold = comm, threshold_s
        self.arrivals: list[tuple[int, float]] = []  # (step, wall time of its first collective)
        self.attributed: list[tuple[int, int, float]] = []  # (step, rank, lag s), every window so far
        self.hosts: list[str] | None = None
        self._since = time.time()

    def begin_step(self) -> None:
        """This rank, as a step's work begins (its first micro-batch is asked for)."""
        self._since = time.time()

    def end_step(self, step: int) -> None:
        """This rank, after each step's last collective: note when it arrived at the step's first."""
        first = None
        group, since = self.comm.group, self._since
        for e in reversed(RECORDER.ring):
            if e[6] < since:
                break
            if e[2] == group:
                first = e[6]
        self.arrivals.append((step, first if first is not None else since))

    def reduce(self) -> dict:
        """Collective: this window's straggler fields; the attributions are kept in ``attributed``."""
        if self.hosts is None:
            self.hosts = [b.decode() for b in allgather_bytes(self.comm, self.comm.env.host.encode())]
        steps = [s for s, _ in self.arrivals]
        mine = torch.tensor([t for _, t in self.arrivals], dtype=torch.float64)
        rows = [torch.zeros_like(mine) for _ in range(self.comm.world_size)]
        self.comm.allgather(rows, mine)
        self.arrivals = []
        if not steps:
            return {}
        times = torch.stack(rows)  # ranks x steps
        lags = times - times.min(dim=0).values
        worst, who = lags.max(dim=0)
        counts: dict[int, list[float]] = {}
        for step, lag, r in zip(steps, worst.tolist(), who.tolist()):
            if lag > self.threshold:
                self.attributed.append((step, r, lag))
                counts.setdefault(r, []).append(lag)
        out = {"straggler_rank": -1, "slow_steps": sum(len(v) for v in counts.values())}
        if counts:
            r, lagged = max(counts.items(), key=lambda kv: len(kv[1]))
            if 2 * len(lagged) >= len(steps):
                out.update(straggler_rank=r, straggler_lag_s=sum(lagged) / len(lagged), straggler_host=self.hosts[r])
        return out
