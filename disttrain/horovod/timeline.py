"""The Horovod timeline: a Chrome trace (chrome://tracing, Perfetto) of every op this rank ran.

    hvd.start_timeline("/tmp/timeline.json")   # all ranks call it; rank 0 writes the file
    ...
    hvd.stop_timeline()                        # or hvd.shutdown(); HOROVOD_TIMELINE=path works too

As in Horovod, each tensor name is a row (a trace "process") with two phases per op:
``NEGOTIATE_<OP>`` (from submission until every rank had submitted it: a long bar means a
straggler) and ``<OP>`` (the transfer, until the engine completed it). Unlike Horovod, the
file is one valid JSON object (``{"traceEvents": [...]}``), written when the timeline stops,
and it shows rank 0's view only.
"""

from __future__ import annotations

import json
import os
import threading
import time

_lock = threading.Lock()
_active: Timeline | None = None


class Timeline:
    def __init__(self, path: str, rank: int, mark_cycles: bool):
        self.path, self.rank, self.mark_cycles = path, rank, mark_cycles
        self.t0 = time.perf_counter()
        self.events: list[dict] = []
        self.pids: dict[str, int] = {}

    def _us(self, t: float) -> float:
        return round((t - self.t0) * 1e6, 3)

    def _pid(self, name: str) -> int:
        pid = self.pids.get(name)
        if pid is None:
            pid = self.pids[name] = len(self.pids) + 1
            self.events.append({"name": "process_name", "ph": "M", "pid": pid, "args": {"name": name}})
            self.events.append({"name": "process_sort_index", "ph": "M", "pid": pid, "args": {"sort_index": pid}})
        return pid

    def record(self, name: str, op: str, t_start: float, t_agreed: float, t_done: float, args: dict) -> None:
        with _lock:
            pid = self._pid(name)
            self.events.append(
                {
                    "name": f"NEGOTIATE_{op.upper()}",
                    "ph": "X",
                    "pid": pid,
                    "tid": 1,
                    "ts": self._us(t_start),
                    "dur": self._us(t_agreed) - self._us(t_start),
                    "args": args,  # the engine's "cache": "hit", or why the response cache missed
                }
            )
            self.events.append(
                {
                    "name": op.upper(),
                    "ph": "X",
                    "pid": pid,
                    "tid": 1,
                    "ts": self._us(t_agreed),
                    "dur": max(0.0, self._us(t_done) - self._us(t_agreed)),
                    "args": args,
                }
            )

    def instant(self, name: str, t: float, args: dict) -> None:
        """A mark across the whole trace (a cycle that missed the response cache, and why)."""
        with _lock:
            self.events.append({"name": name, "ph": "i", "s": "g", "pid": 0, "tid": 0, "ts": self._us(t), "args": args})

    def write(self) -> None:
        doc = {
            "traceEvents": self.events,
            "displayTimeUnit": "ms",
            "otherData": {"producer": "disttrain.horovod", "rank": self.rank},
        }
        tmp = f"{self.path}.tmp{os.getpid()}"
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(tmp, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, self.path)


def active() -> Timeline | None:
    return _active


def start_timeline(file_path: str, rank: int, mark_cycles: bool = False) -> None:
    """All ranks (only rank 0 records and writes). Replaces a running timeline."""
    global _active
    stop_timeline()
    if rank == 0:
        _active = Timeline(file_path, 0, mark_cycles)


def stop_timeline() -> None:
    """All ranks: stop recording; rank 0 writes the file."""
    global _active
    tl, _active = _active, None
    if tl is not None:
        tl.write()
