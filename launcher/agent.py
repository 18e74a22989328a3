"""The per-node agent: starts this node's workers, watches them, stops them all on a failure.

Call order (one agent per node): ``run()`` blocks until the worker group succeeds or
fails for good. After a failure it restarts the whole group, up to ``max_restarts``
times, with ``DISTTRAIN_RESTART_COUNT`` (and torchrun's ``TORCHELASTIC_RESTART_COUNT``)
counting attempts, so a trainer resumes from its latest checkpoint.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import sys
import tempfile
import time

from .environment import WorkerPlace, worker_env
from .report import Failure, format_report, root_cause
from .worker import Worker, WorkerSpec, WorkerState

log = logging.getLogger(__name__)


@dataclasses.dataclass
class NodeSpec:
    """This node's place in the job."""

    node_rank: int = 0
    nnodes: int = 1
    rank_offset: int = 0  # global rank of this node's local rank 0
    world_size: int | None = None  # default: nproc * nnodes
    host: str = dataclasses.field(default_factory=socket.gethostname)
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    job_id: str = "local"
    store: str | None = None
    secret: str | None = None


@dataclasses.dataclass
class RunResult:
    exit_code: int
    failures: list[Failure]
    restarts: int

    @property
    def root_cause(self) -> Failure | None:
        return root_cause(self.failures) if self.failures else None


class LocalAgent:
    def __init__(self, spec: WorkerSpec, node: NodeSpec, *, max_restarts: int = 0, stop_grace: float = 5.0,
                 monitor_interval: float = 0.05, report_stream=sys.stderr):
        self.spec, self.node, self.max_restarts = spec, node, max_restarts
        self.stop_grace, self.monitor_interval, self.report_stream = stop_grace, monitor_interval, report_stream
        self.workers: list[Worker] = []
        self._interrupted: int | None = None
        self._error_dir = tempfile.mkdtemp(prefix=f"disttrain-{node.job_id}-errors-")

    # -- lifecycle --------------------------------------------------------------------------
    def _start_group(self, attempt: int) -> None:
        world = self.node.world_size or self.spec.nproc * self.node.nnodes
        self.workers = []
        for local_rank in range(self.spec.nproc):
            rank = self.node.rank_offset + local_rank
            place = WorkerPlace(rank, local_rank, world, self.spec.nproc, self.node.node_rank, self.node.nnodes)
            error_file = os.path.join(self._error_dir, f"attempt{attempt}", f"rank{rank}.json")
            env = worker_env(place, job_id=self.node.job_id, host=self.node.host,
                             master_addr=self.node.master_addr, master_port=self.node.master_port,
                             restart_count=attempt, max_restarts=self.max_restarts, error_file=error_file,
                             store=self.node.store, secret=self.node.secret)
            w = Worker(self.spec, rank, local_rank, self.node.host, env)
            w.start()
            self.workers.append(w)

    def _monitor(self) -> list[Failure]:
        """Block until all workers succeed (returns []) or one fails or we are interrupted."""
        while True:
            if self._interrupted is not None:
                return []
            codes = [w.poll() for w in self.workers]
            failed = [w for w in self.workers if w.state is WorkerState.FAILED]
            if failed:
                return [w.failure() for w in failed]
            if all(c is not None for c in codes):
                return []
            time.sleep(self.monitor_interval)

    def stop_all(self) -> list[Failure]:
        """SIGTERM every running worker, SIGKILL after the grace period; returns any further failures."""
        for w in self.workers:
            if w.poll() is None:
                w.stop()
        deadline = time.monotonic() + self.stop_grace
        while time.monotonic() < deadline and any(w.poll() is None for w in self.workers):
            time.sleep(0.02)
        for w in self.workers:
            w.kill_group()
            if w.proc is not None:
                w.proc.wait()
            w.join_output()
        return []

    def _on_signal(self, signum, frame) -> None:
        self._interrupted = signum

    def run(self) -> RunResult:
        """Run the worker group to completion; blocks. Returns the exit code the launcher should use."""
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            attempt = 0
            while True:
                self._start_group(attempt)
                failures = self._monitor()
                if self._interrupted is not None:
                    self.stop_all()
                    return RunResult(128 + self._interrupted, [], attempt)
                if not failures:
                    for w in self.workers:
                        w.join_output()
                    return RunResult(0, [], attempt)
                # Give peers a moment: their own failures (victims) show up in the report too.
                time.sleep(0.2)
                failures += [w.failure() for w in self.workers
                             if w.poll() not in (None, 0) and w.rank not in {f.rank for f in failures}]
                self.stop_all()
                for f in failures:  # re-read tails now that the pumps have drained
                    w = next(w for w in self.workers if w.rank == f.rank)
                    f.stderr_tail = list(w.pumps[1].tail)
                if attempt >= self.max_restarts:
                    print(format_report(failures, self.node.job_id), file=self.report_stream, flush=True)
                    return RunResult(root_cause(failures).exit_code, failures, attempt)
                root = root_cause(failures)
                print(f"disttrain: rank {root.rank} on {root.host} failed ({root.how}); restarting worker group "
                      f"(restart {attempt + 1} of {self.max_restarts})", file=self.report_stream, flush=True)
                attempt += 1
        finally:
            for s, h in old.items():
                signal.signal(s, h)
