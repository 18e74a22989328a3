"""The per-node agent: starts this node's workers, watches them, stops them all on a failure.

Call order (one agent per node): ``run()`` blocks until the job's worker group succeeds or
fails for good. After a failure on any node every agent stops its workers and, once all
have stopped (agreed through the store, see :mod:`launcher.rendezvous`), restarts them,
up to ``max_restarts`` times, with ``DISTTRAIN_RESTART_COUNT`` (and torchrun's
``TORCHELASTIC_RESTART_COUNT``) counting attempts, so a trainer resumes from its latest
checkpoint. The agent never imports torch.

Who hosts the store: the fan-out launcher (``launcher.job``) when there is one; else
this agent, when ``NodeSpec.host_store`` is set (node 0 of a torchrun-style manual start)
or when the node is alone and was given no store.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time

from .environment import WorkerPlace, worker_env
from .errors import LaunchConfigError
from .hang import HangWatch
from .rendezvous import Rendezvous, RoundState, wait_exited
from .report import Failure, format_report, root_cause
from .ssh import is_local
from .store import StoreClient, StoreError, StoreServer, check_secret, new_secret
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
    store: str | None = None  # host:port of the job's store; None: a lone node hosts its own
    secret: str | None = None  # default: DISTTRAIN_JOB_SECRET, else a fresh one (lone node only)
    host_store: bool = False  # this agent opens the store at ``store``'s port (manual multi-node, node 0)
    rdzv_timeout: float = 120.0  # how long agents wait for each other


@dataclasses.dataclass
class RunResult:
    exit_code: int
    failures: list[Failure]
    restarts: int

    @property
    def root_cause(self) -> Failure | None:
        return root_cause(self.failures) if self.failures else None


class LocalAgent:
    def __init__(
        self,
        spec: WorkerSpec,
        node: NodeSpec,
        *,
        max_restarts: int = 0,
        stop_grace: float = 5.0,
        monitor_interval: float = 0.05,
        report_stream=sys.stderr,
        report: bool = True,
        hang_timeout: float = 0.0,
        hang_stop: bool = True,
    ):
        self.spec, self.node, self.max_restarts = spec, node, max_restarts
        self.stop_grace, self.monitor_interval, self.report_stream = stop_grace, monitor_interval, report_stream
        self.report = report  # False when a fan-out launcher prints the merged report
        self.workers: list[Worker] = []
        self._interrupted: int | None = None
        self._error_dir = tempfile.mkdtemp(prefix="disttrain-errors-")  # 0700; no job id in a /tmp name
        self._server: StoreServer | None = None
        self.hang_timeout = hang_timeout  # seconds without a finished collective before the hang report; 0: off
        self._hang: HangWatch | None = None
        self.hang_stop = hang_stop  # False: print the report and keep waiting

    def interrupt(self, signum: int = signal.SIGTERM) -> None:
        """Stop the job from another thread (Ctrl-C, or the launcher's connection closed)."""
        self._interrupted = signum

    # -- store ------------------------------------------------------------------------------
    def _open_store(self) -> Rendezvous:
        node = self.node
        secret = node.secret
        if secret is None and os.environ.get("DISTTRAIN_JOB_SECRET"):
            secret = check_secret(os.environ["DISTTRAIN_JOB_SECRET"], "DISTTRAIN_JOB_SECRET")
        if secret is None:
            if node.nnodes > 1 and not node.host_store and node.store is not None:
                raise LaunchConfigError(
                    f"node {node.node_rank} ({node.host}) has no job secret. HINT: export the "
                    "same DISTTRAIN_JOB_SECRET on every node (or start all nodes with "
                    "--hosts/--hostfile from one place)"
                )
            secret = new_secret()
        node.secret = secret
        if node.store is None or node.host_store:
            host, port = "127.0.0.1", 0
            if node.store is not None:
                host, _, p = node.store.rpartition(":")
                port = int(p)
            bind = socket.gethostbyname(host) if is_local(host) else "0.0.0.0"
            self._server = StoreServer(secret, bind, port, advertise=host).start()
            node.store = self._server.address
        client = StoreClient(node.store, secret, timeout=node.rdzv_timeout, connect_timeout=node.rdzv_timeout)
        return Rendezvous(client, node.node_rank, node.nnodes, node.host)

    # -- lifecycle --------------------------------------------------------------------------
    def _start_group(self, attempt: int) -> None:
        world = self.node.world_size or self.spec.nproc * self.node.nnodes
        self.workers = []
        if self.hang_timeout > 0:
            ranks = [self.node.rank_offset + i for i in range(self.spec.nproc)]
            trace = os.path.join(self._error_dir, f"attempt{attempt}", "trace")
            self._hang = HangWatch(trace, ranks, self.hang_timeout, self.node.host)
        for local_rank in range(self.spec.nproc):
            rank = self.node.rank_offset + local_rank
            place = WorkerPlace(rank, local_rank, world, self.spec.nproc, self.node.node_rank, self.node.nnodes)
            error_file = os.path.join(self._error_dir, f"attempt{attempt}", f"rank{rank}.json")
            env = worker_env(
                place,
                job_id=self.node.job_id,
                host=self.node.host,
                master_addr=self.node.master_addr,
                master_port=self.node.master_port,
                restart_count=attempt,
                max_restarts=self.max_restarts,
                error_file=error_file,
                store=self.node.store,
                secret=self.node.secret,
            )
            if self.hang_timeout > 0:  # the workers' flight recorders beat and dump here (launcher.hang)
                env["DISTTRAIN_TRACE_DIR"] = os.path.join(self._error_dir, f"attempt{attempt}", "trace")
            w = Worker(self.spec, rank, local_rank, self.node.host, env)
            w.start()
            self.workers.append(w)
        if self._hang is not None:  # for a faulthandler stack dump of a rank that cannot answer
            self._hang.pids = {w.rank: w.proc.pid for w in self.workers if w.proc is not None}

    def _monitor(self, rdzv: Rendezvous, attempt: int) -> RoundState:
        """Block until this round ends: all nodes' workers succeed, one fails anywhere, or we stop."""
        next_store_poll = 0.0
        while True:
            if self._interrupted is not None:
                return RoundState.ABORTED
            codes = [w.poll() for w in self.workers]
            report = self._hang.poll() if self._hang is not None else None
            if report is not None:
                print(report, file=self.report_stream, flush=True)
                if self.hang_stop:
                    rdzv.mark_failed(attempt)
                    return RoundState.FAILED
                self._hang.reset()
            if any(w.state is WorkerState.FAILED for w in self.workers):
                rdzv.mark_failed(attempt)
                return RoundState.FAILED
            if all(c is not None for c in codes):
                rdzv.mark_succeeded(attempt)
            now = time.monotonic()
            if now >= next_store_poll:
                state = rdzv.poll(attempt)
                if state is not RoundState.RUNNING:
                    return state
                next_store_poll = now + 0.1
            time.sleep(self.monitor_interval)

    def stop_all(self) -> None:
        """SIGTERM every running worker, SIGKILL after the grace period, drain their output."""
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

    def _on_signal(self, signum, frame) -> None:
        self._interrupted = signum

    def run(self) -> RunResult:
        """Run the worker group to completion; blocks. Returns the exit code the launcher should use."""
        in_main = threading.current_thread() is threading.main_thread()
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
        rdzv = None
        try:
            rdzv = self._open_store()
            rdzv.join()
            return self._run_rounds(rdzv)
        except StoreError as exc:
            self.stop_all()
            print(f"disttrain: agent on {self.node.host}: {exc}", file=self.report_stream, flush=True)
            if rdzv is not None:
                rdzv.abort(str(exc))
            return RunResult(1, [], 0)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            if self._server is not None:
                if rdzv is not None:
                    wait_exited(rdzv.client, self.node.nnodes, self.node.rdzv_timeout if self.node.nnodes > 1 else 0)
                self._server.close()
            if rdzv is not None:
                rdzv.client.close()
            shutil.rmtree(self._error_dir, ignore_errors=True)

    def _run_rounds(self, rdzv: Rendezvous) -> RunResult:
        attempt = 0
        while True:
            self._start_group(attempt)
            state = self._monitor(rdzv, attempt)
            if state is RoundState.SUCCEEDED:
                for w in self.workers:
                    w.join_output()
                rdzv.finish(attempt, 0)
                return RunResult(0, [], attempt)
            if state is RoundState.ABORTED:
                self.stop_all()
                if self._interrupted is not None:
                    rdzv.abort(f"interrupted by {signal.Signals(self._interrupted).name}")
                code = 128 + (self._interrupted or signal.SIGTERM)
                rdzv.finish(attempt, code)
                return RunResult(code, [], attempt)
            failures = self._stop_after_failure()
            rdzv.publish_failures(attempt, failures)
            all_stopped = rdzv.stopped_barrier(attempt, self.stop_grace + self.node.rdzv_timeout)
            if attempt < self.max_restarts and all_stopped and self._interrupted is None:
                merged = rdzv.collect_failures(attempt)
                if self.node.node_rank == 0 and merged:
                    root = root_cause(merged)
                    print(
                        f"disttrain: rank {root.rank} on {root.host} failed ({root.how}); restarting worker "
                        f"group (restart {attempt + 1} of {self.max_restarts})",
                        file=self.report_stream,
                        flush=True,
                    )
                attempt += 1
                continue
            merged = rdzv.collect_failures(attempt) or failures
            code = root_cause(merged).exit_code if merged else 1
            if self.report and merged and (self.node.node_rank == 0 or self.node.nnodes == 1):
                print(format_report(merged, self.node.job_id), file=self.report_stream, flush=True)
            elif self.report and merged:
                print(f"disttrain: job {self.node.job_id} failed; node 0 prints the report", file=self.report_stream)
            rdzv.finish(attempt, code)
            return RunResult(code, merged, attempt)

    def _stop_after_failure(self) -> list[Failure]:
        """Stop this node's workers; return those that failed on their own (not by our signal)."""
        # Give local peers a moment: their own failures (victims) show up in the report too.
        time.sleep(0.2)
        self.stop_all()  # polls each worker before signalling it: one already dead stays FAILED, not STOPPED
        return [w.failure() for w in self.workers if w.state is WorkerState.FAILED]
