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
from .hang_exchange import HangExchange
from .inplace import HandOver, lost_ranks
from .membership import Heartbeat, Transition, format_transitions, next_members
from .node import NodeSpec, RunResult
from .rendezvous import Rendezvous, RoundState, wait_exited
from .replica_store import ENV as REPLICA_ENV
from .replica_store import SHM_ENV as REPLICA_SHM_ENV
from .replica_store import ReplicaDirError, ReplicaStore, round_env, start_replica_store
from .report import Failure, format_report, root_cause
from .ssh import is_local
from .store import StoreClient, StoreError, StoreServer, check_secret, new_secret
from .worker import Worker, WorkerSpec, WorkerState

log = logging.getLogger(__name__)


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
        held_signals: tuple[int, ...] = (),
    ):
        self.spec, self.node, self.max_restarts = spec, node, max_restarts
        self.stop_grace, self.monitor_interval, self.report_stream = stop_grace, monitor_interval, report_stream
        self.report = report  # False when a fan-out launcher prints the merged report
        self.workers: list[Worker] = []
        # Signals the workers start with blocked (SLURM's warning): one that comes before a worker installed its
        # handler waits for it instead of killing set-up; :meth:`forward` passes them on, to later groups too.
        self.held_signals, self._forwarded = tuple(held_signals), []
        self._interrupted: int | None = None
        self._error_dir = tempfile.mkdtemp(prefix="disttrain-errors-")  # 0700; no job id in a /tmp name
        self._server: StoreServer | None = None
        self._replicas: ReplicaStore | None = None  # peers' in-memory copies (launcher.replica_store)
        self._replica_env = ""
        self.hang_timeout = hang_timeout  # seconds without a finished collective before the hang report; 0: off
        self._hang: HangWatch | None = None
        self._heartbeat: Heartbeat | None = None
        self._cut_off = False  # this node lost the store: it stops without writing
        self._final_round = 0  # the round running or last run
        self._pending: Transition | None = None  # the transition into the round about to start
        self.hang_stop = hang_stop  # False: print the report and keep waiting
        self._handover: HandOver | None = None  # recovery in place (launcher.inplace); set with the store
        self._moving = False  # the next round keeps this round's workers (in place)

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
            self._server = StoreServer(secret, bind, port, advertise=host, job=node.job_id).start()
            node.store = self._server.address
        client = StoreClient(
            node.store, secret, timeout=node.rdzv_timeout, connect_timeout=node.rdzv_timeout, job=node.job_id
        )
        return Rendezvous(client, node.node_rank, node.nnodes, node.host)

    # -- lifecycle --------------------------------------------------------------------------
    def _worker_envs(self, attempt: int, members: list[int]) -> list[tuple[int, dict[str, str]]]:
        """(global rank, environment) of each local worker of round ``attempt`` with ``members``."""
        world = self.node.world_size or self.spec.nproc * self.node.nnodes
        offset, group_rank, nnodes = self.node.rank_offset, self.node.node_rank, self.node.nnodes
        if len(members) != self.node.nnodes:  # a shrunk or grown round: ranks follow the members' order
            group_rank, nnodes = members.index(self.node.node_rank), len(members)
            offset, world = group_rank * self.spec.nproc, len(members) * self.spec.nproc
        out = []
        for local_rank in range(self.spec.nproc):
            rank = offset + local_rank
            place = WorkerPlace(rank, local_rank, world, self.spec.nproc, group_rank, nnodes)
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
            if self._replica_env:
                env[REPLICA_ENV] = self._replica_env
            if self._replicas is not None:  # host-local copies skip the network (launcher.replica_store)
                env[REPLICA_SHM_ENV] = self._replicas.shm_dir
            if self.hang_timeout > 0:  # the workers' flight recorders beat and dump here (launcher.hang)
                env["DISTTRAIN_TRACE_DIR"] = os.path.join(self._error_dir, f"attempt{attempt}", "trace")
            out.append((rank, env))
        return out

    def _start_group(self, attempt: int, members: list[int]) -> None:
        envs = self._worker_envs(attempt, members)
        self._watch_hangs(attempt, [rank for rank, _ in envs])  # its directory exists before a worker starts
        self.workers = []
        held = signal.pthread_sigmask(signal.SIG_BLOCK, self.held_signals) if self.held_signals else None
        earlier = list(self._forwarded)  # one that arrives while unblocking below reaches forward() instead
        try:
            for local_rank, (rank, env) in enumerate(envs):
                w = Worker(self.spec, rank, local_rank, self.node.host, env)
                w.start()  # inherits the blocked signals; launcher.slurm.signals unblocks them once caught
                self.workers.append(w)
        finally:
            if held is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)  # a pending one now reaches forward()
        for s in earlier:  # a warning from before this group started (or before a restart): once each
            for w in self.workers:
                w.signal(s)
        if self._hang is not None:  # for a faulthandler stack dump of a rank that cannot answer
            self._hang.pids = {w.rank: w.proc.pid for w in self.workers if w.proc is not None}

    def forward(self, signum: int) -> None:
        """Pass a warning signal on to this node's workers, and to any group started later in the job."""
        if signum not in self._forwarded:
            self._forwarded.append(signum)
        for w in self.workers:
            w.signal(signum)

    def _watch_hangs(self, attempt: int, ranks: list[int]) -> None:
        """With a hang timeout: watch round ``attempt``'s trace directory (made here) for ``ranks``."""
        if self.hang_timeout > 0:
            trace = os.path.join(self._error_dir, f"attempt{attempt}", "trace")
            self._hang = HangWatch(trace, ranks, self.hang_timeout, self.node.host)

    def _move_group(self, attempt: int, members: list[int]) -> None:
        """Recovery in place: the running workers of round ``attempt - 1`` take their places in round
        ``attempt`` (launcher.inplace) instead of new processes."""
        moves = []
        for w, (rank, env) in zip(self.workers, self._worker_envs(attempt, members)):
            changed = {k: v for k, v in env.items() if w.env.get(k) != v and k != "DISTTRAIN_JOB_SECRET"}
            moves.append((w.rank, changed))  # what differs: the place, the attempt
            w.rank, w.env = rank, env
        self._watch_hangs(attempt, [w.rank for w in self.workers])  # first: the moved workers beat into it
        if self._hang is not None:
            self._hang.pids = {w.rank: w.proc.pid for w in self.workers if w.proc is not None}
        for old_rank, changed in moves:
            self._handover.move(attempt - 1, old_rank, changed)

    def _monitor(self, rdzv: Rendezvous, attempt: int) -> RoundState:
        """Block until this round ends: all nodes' workers succeed, one fails anywhere, a member's
        heartbeats stop, or we stop."""
        next_store_poll = 0.0
        hang = None
        if self._hang is not None:  # every node watches its own ranks; they meet in the store
            hang = HangExchange(rdzv.client, self._hang, attempt, self.node.node_rank, rdzv.members(attempt))
        while True:
            if self._interrupted is not None:
                return RoundState.ABORTED
            codes = [w.poll() for w in self.workers]
            if any(w.state is WorkerState.FAILED for w in self.workers):
                failed = next(w for w in self.workers if w.state is WorkerState.FAILED)
                rdzv.mark_failed(attempt, f"rank {failed.rank} on {failed.host} failed ({failed.failure().how})")
                return RoundState.FAILED
            if all(c is not None for c in codes):
                rdzv.mark_succeeded(attempt)
            now = time.monotonic()
            if now >= next_store_poll:
                found = hang.poll() if hang is not None else None
                if found is not None and found.text is not None:  # the head: one report for the job
                    print(found.text, file=self.report_stream, flush=True)
                    if self.hang_stop:
                        who = ", ".join(map(str, found.behind)) or "none clearly"
                        rdzv.mark_failed(attempt, f"hang: {found.why}; rank(s) behind: {who}")
                        return RoundState.FAILED
                state = rdzv.poll(attempt)
                if state is not RoundState.RUNNING:
                    return state
                members = rdzv.members(attempt)
                lost = [n for n in self._lost() if n in members]
                if lost:
                    hosts = ", ".join(rdzv.host_of(n) for n in lost)
                    rdzv.mark_failed(attempt, f"host {hosts} lost: no heartbeat for {self._heartbeat.timeout:g}s")
                    return RoundState.FAILED
                if (
                    self.node.nodes_range.elastic
                    and len(members) < self.node.nnodes
                    and (back := rdzv.waiting(members))
                ):
                    rdzv.mark_failed(attempt, f"host {', '.join(rdzv.host_of(n) for n in back)} came back")
                    return RoundState.FAILED
                next_store_poll = now + 0.1
            time.sleep(self.monitor_interval)

    def stop_all(self, kill: bool = False) -> None:
        """SIGTERM every running worker (``kill``: none), SIGKILL after the grace period, drain their output."""
        for w in self.workers:
            if w.poll() is None and not kill:
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
            if self.node.holds_replicas:
                node = self.node
                self._replicas = start_replica_store(
                    rdzv.client, node.store, node.secret, node.job_id, node.node_rank, node.replica_bytes
                )
            rdzv.join()
            first = 0
            if self.node.nnodes > 1 and rdzv.rejoining():
                first = rdzv.wait_admitted()
                if first is None:
                    print(f"disttrain: agent on {self.node.host}: the job ended before this host could rejoin")
                    return RunResult(0, [], 0)
            self._start_heartbeat(rdzv)
            self._handover = HandOver(rdzv.client)
            return self._run_rounds(rdzv, first)
        except (StoreError, ReplicaDirError) as exc:  # the latter: a base another user could swap, refused
            self.stop_all(kill=self._cut_off)
            msg = str(exc)
            if self._cut_off:
                msg = (
                    f"cut off from the job's store at {self.node.store} for {self._heartbeat.silent_for():.1f}s "
                    "(its host is gone, or a partition left this host in the minority); stopped this "
                    "host's workers without letting them write"
                )
            print(f"disttrain: agent on {self.node.host}: {msg}", file=self.report_stream, flush=True)
            if rdzv is not None and not self._cut_off:
                rdzv.abort(msg)
            return RunResult(1, [], 0)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            if self._server is not None:
                if rdzv is not None:
                    self._wait_peers_exited(rdzv)
                self._server.close()
            if self._heartbeat is not None:
                self._heartbeat.stop()
            if self._replicas is not None:
                self._replicas.close()
            if rdzv is not None:
                rdzv.client.close()
            shutil.rmtree(self._error_dir, ignore_errors=True)

    # -- membership -------------------------------------------------------------------------
    def _start_heartbeat(self, rdzv: Rendezvous) -> None:
        """Multi-node jobs only: beats through the store, and a watchdog that cuts this node off
        (SIGKILL its workers, fail the main thread's store call) when the store stops answering."""
        if self.node.nnodes <= 1:
            return
        hb = Heartbeat(
            self.node.store,
            self.node.secret,
            self.node.node_rank,
            timeout=self.node.heartbeat_timeout,
            job=self.node.job_id,
        )
        hb.on_silent = lambda: self._on_cut_off(rdzv)
        hb.start()
        self._heartbeat = hb

    def _on_cut_off(self, rdzv: Rendezvous) -> None:
        self._cut_off = True
        for w in self.workers:
            w.kill_group()  # no SIGTERM: a worker must not take a stop request as a cue to write
        rdzv.client.interrupt()

    def _lost(self) -> list[int]:
        return self._heartbeat.lost() if self._heartbeat is not None else []

    def _wait_peers_exited(self, rdzv: Rendezvous) -> None:
        try:
            nodes = rdzv.members(self._final_round)
            wait_exited(rdzv.client, nodes, self.node.rdzv_timeout if self.node.nnodes > 1 else 0, self._lost)
        except StoreError:
            pass

    def _next_round(
        self, rdzv: Rendezvous, attempt: int, lost: list[int], joined: list[int], detected_at: float
    ) -> list[int]:
        """After a round that lost members or saw hosts come back: agree on the next round's nodes
        ([]: the job stops)."""
        members = rdzv.members(attempt)
        nodes, why = next_members(members, lost, joined, self.node.nodes_range)
        record = Transition(
            round=attempt + 1,
            cause=rdzv.cause(attempt) or why,
            lost=[rdzv.host_of(n) for n in lost],
            joined=[rdzv.host_of(n) for n in joined if n in nodes],
            world_before=len(members) * self.spec.nproc,
            world_after=len(nodes) * self.spec.nproc,
            detected_at=detected_at,
        )
        if not nodes:
            record.cause += f"; stopping: {why}"
        agreed, won = rdzv.propose(attempt + 1, nodes, record.to_json())
        rdzv.admitted([n for n in agreed if n not in members])
        self._pending = Transition.from_json(won)
        return agreed

    def _report_transitions(self, rdzv: Rendezvous) -> None:
        if not self.report or self.node.node_rank != min(rdzv.members(self._final_round)):
            return
        text = format_transitions([Transition.from_json(t) for t in rdzv.transitions()], self.node.job_id)
        if text:
            print(text, file=self.report_stream, flush=True)

    def _run_rounds(self, rdzv: Rendezvous, attempt: int = 0) -> RunResult:
        restarts = 0
        while True:
            self._final_round = attempt
            members = rdzv.members(attempt)
            if self._heartbeat is not None:
                self._heartbeat.watch(members)
            rdzv.begin(attempt)
            if self._replicas is not None:
                self._replica_env = round_env(rdzv.client, self._replicas.job_id, members)
            if self._moving:
                self._move_group(attempt, members)
            else:
                self._start_group(attempt, members)
            self._moving = False
            if self._pending is not None and self.node.node_rank == min(members):
                self._pending.seconds = time.time() - self._pending.detected_at
                rdzv.record_transition(self._pending.to_json())
                print(f"disttrain: {self._pending.describe()}", file=self.report_stream, flush=True)
            self._pending = None
            state = self._monitor(rdzv, attempt)
            if state is RoundState.SUCCEEDED:
                for w in self.workers:
                    w.join_output()
                rdzv.finish(attempt, 0)
                self._report_transitions(rdzv)
                return RunResult(0, [], attempt)
            if state is RoundState.ABORTED:
                self.stop_all()
                if self._interrupted is not None:
                    rdzv.abort(f"interrupted by {signal.Signals(self._interrupted).name}")
                code = 128 + (self._interrupted or signal.SIGTERM)
                rdzv.finish(attempt, code)
                return RunResult(code, [], attempt)
            detected_at = time.time()
            keep = self._keep_in_place(rdzv, attempt)  # the workers stay; they abort the step in flight
            failures = [] if keep else self._stop_after_failure()
            rdzv.publish_failures(attempt, failures)
            all_stopped, lost = rdzv.stopped_barrier(attempt, self.stop_grace + self.node.rdzv_timeout, self._lost)
            joined = rdzv.waiting(rdzv.members(attempt)) if self.node.nodes_range.elastic else []
            if (lost or joined) and all_stopped and self._interrupted is None:
                nodes = self._next_round(rdzv, attempt, lost, joined, detected_at)
                if self.node.node_rank in nodes:
                    self._moving = keep
                    attempt += 1
                    continue
                failures = self._stop_kept(keep, attempt, "this host is left out of the next round") or failures
                if nodes:  # the others went on without this node
                    print(
                        f"disttrain: agent on {self.node.host}: left out of round {attempt + 1} (the "
                        "others counted this host lost); stopping",
                        file=self.report_stream,
                        flush=True,
                    )
                elif self.node.node_rank == min(n for n in rdzv.members(attempt) if n not in lost):
                    rdzv.record_transition(self._pending.to_json())
                return self._give_up(rdzv, attempt, failures, lost, 1)
            failures = self._stop_kept(keep, attempt, "no new world without a lost host; restarting") or failures
            if restarts < self.max_restarts and all_stopped and self._interrupted is None:
                merged = rdzv.collect_failures(attempt)
                if self.node.node_rank == min(rdzv.members(attempt)) and merged:
                    root = root_cause(merged)
                    print(
                        f"disttrain: rank {root.rank} on {root.host} failed ({root.how}); restarting worker "
                        f"group (restart {restarts + 1} of {self.max_restarts})",
                        file=self.report_stream,
                        flush=True,
                    )
                restarts += 1
                attempt += 1
                rdzv.propose(attempt, rdzv.members(attempt - 1), "")
                continue
            return self._give_up(rdzv, attempt, failures, lost, None)

    def _give_up(
        self, rdzv: Rendezvous, attempt: int, failures: list[Failure], lost: list[int], code: int | None
    ) -> RunResult:
        """The job ends after a failed round: merge the report (naming lost hosts), record the exit code."""
        merged = rdzv.collect_failures(attempt, skip=lost) or failures
        if code is None:
            code = root_cause(merged).exit_code if merged else 1
        lead = self.node.node_rank == min(n for n in rdzv.members(attempt) if n not in lost)
        if self.report and lost and lead:
            hosts = ", ".join(f"{rdzv.host_of(n)} (node {n})" for n in lost)
            print(
                f"disttrain: job {self.node.job_id}: host(s) {hosts} lost (no heartbeat for "
                f"{self.node.heartbeat_timeout:g}s); the round ended with: {rdzv.cause(attempt)}"
                + (
                    ""
                    if self.node.nodes_range.elastic
                    else f". HINT: --nnodes MIN:{self.node.nnodes} lets the others go on"
                ),
                file=self.report_stream,
                flush=True,
            )
        if self.report and merged and (lead or self.node.nnodes == 1):
            print(format_report(merged, self.node.job_id), file=self.report_stream, flush=True)
        elif self.report and merged:
            print(f"disttrain: job {self.node.job_id} failed; node 0 prints the report", file=self.report_stream)
        rdzv.finish(attempt, code)
        self._report_transitions(rdzv)
        return RunResult(code, merged, attempt)

    def _keep_in_place(self, rdzv: Rendezvous, attempt: int) -> bool:
        """After round ``attempt`` failed: True when this node's workers change world in place (all alive,
        all declared); the round's end is then announced to them. A lost host is the only cause
        for which that pays: a failed local worker, a hang or an interrupt take the restart path."""
        alive = self._interrupted is None and all(w.poll() is None for w in self.workers)
        if self._handover is None or not self._handover.eligible(attempt, [w.rank for w in self.workers], alive):
            return False
        lost = [m for m in self._lost() if m in rdzv.members(attempt)]
        self._handover.end(
            attempt, rdzv.cause(attempt), lost_ranks(rdzv.members(attempt), lost, self.spec.nproc, rdzv.host_of)
        )
        return True

    def _stop_kept(self, keep: bool, attempt: int, why: str) -> list[Failure]:
        """Workers kept for an in-place change that does not happen: told to exit, then stopped as before."""
        if not keep or self._handover is None or all(w.poll() is not None for w in self.workers):
            return []
        self._handover.refuse(attempt, why)
        return self._stop_after_failure()

    def _stop_after_failure(self) -> list[Failure]:
        """Stop this node's workers; return those that failed on their own (not by our signal)."""
        # Give local peers a moment: their own failures (victims) show up in the report too.
        time.sleep(0.2)
        self.stop_all()  # polls each worker before signalling it: one already dead stays FAILED, not STOPPED
        return [w.failure() for w in self.workers if w.state is WorkerState.FAILED]
