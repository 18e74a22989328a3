"""The elastic driver: horovodrun's ``--min-np/--max-np/--host-discovery-script``.

    disttrain launch --min-np 2 --max-np 4 --host-discovery-script ./hosts.sh train.py

One driver per job (``disttrain launch`` runs it, blocks). It opens the job's authenticated store,
runs the discovery script (:mod:`launcher.discovery`) every ``discovery_interval`` seconds, and
keeps one *world*: the ordered list of workers (rank = position) on the hosts it found, at least
``min_np`` and at most ``max_np`` of them. Workers are never restarted by the driver: survivors
stay up and re-form in place (``disttrain.horovod.elastic``); the driver only starts workers for
new slots and publishes each new world through the store:

====================================  ==================================================================
``elastic/world/<v>``                 JSON ``{"version", "workers": [{"id", "host", "local_rank",
                                      "local_size", "cross_rank", "cross_size", "machine"}], "added",
                                      "removed"}``
``elastic/version``                   the newest ``v``; workers poll it and raise HostsUpdatedInterrupt
                                      at their next ``commit()`` / ``check_host_updates()``
``elastic/ready/<v>/<id>``            a worker's arrival at world ``v`` (the workers' own barrier)
``elastic/reset/<id>``                ``v``: a collective failed on this worker in world ``v``; asks for
                                      a new world (a peer died, or the transport broke)
``elastic/done``                      training finished; workers still waiting for a world exit 0
====================================  ==================================================================

A new world is made when the script's answer changes, when a worker exits non-zero (its host is
blacklisted: for the rest of the job, as Horovod does, or with ``--blacklist-cooldown-range MIN MAX``
for MIN seconds, doubling each time it fails again, at most MAX), when a blacklisted host's
cooldown ends, or when a worker asks for a reset. ``--reset-limit N`` stops the job (exit 1) when
it would need more than N new worlds after the first. Ranks
keep their order: the previous world's survivors first, new workers after, so rank 0 is a
survivor holding the last committed state. With fewer than ``min_np`` slots the driver waits up
to ``elastic_timeout`` for the script to find more, then stops. The job succeeds when a worker of
the newest world exits 0 (its world finished training) and no worker of it fails afterwards.

Hosts: a worker on this machine is a child process; on another host it is an ssh session
(``launcher/elastic_remote.py``: argv, environment and secret on ssh's stdin; closing it stops the
worker). The store listens on loopback while the script's first answer names only this machine,
else on an address of this machine (the first local host it lists, or ``--rdzv-endpoint``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time

from .discovery import Discovery, DiscoveryError, diff
from .elastic_remote import RemoteWorker
from .environment import SECRET, WorkerPlace, free_port, worker_env
from .errors import LaunchConfigError
from .job import FORWARD_PREFIXES
from .membership import Transition, format_transitions
from .node import RunResult
from .report import Failure, format_report, root_cause
from .ssh import SshOptions, is_local
from .store import StoreServer, check_secret, new_secret
from .worker import Worker, WorkerSpec

ELASTIC_ID = "DISTTRAIN_ELASTIC_ID"  # a worker's id in elastic/world/<v>; its presence means elastic mode
_MACHINE = socket.gethostname()


@dataclasses.dataclass
class ElasticSpec:
    """How the elastic job grows and shrinks (``disttrain launch --min-np ...``)."""

    discovery: Discovery
    min_np: int
    max_np: int
    discovery_interval: float = 1.0
    elastic_timeout: float = 600.0  # seconds to wait for ``min_np`` slots before giving up
    finish_grace: float = 30.0  # after a world finished: how long its other workers may take to exit
    stop_grace: float = 5.0
    job_id: str = ""
    ssh: SshOptions = dataclasses.field(default_factory=SshOptions)  # workers on other hosts
    env: dict[str, str] = dataclasses.field(default_factory=dict)  # -x NAME=VALUE, sent to other hosts
    store_host: str | None = None  # --rdzv-endpoint's host: where the store listens (other hosts must reach it)
    reset_limit: int | None = None  # new worlds allowed after the first (None: any number)
    blacklist_cooldown: tuple[float, float] | None = None  # (min, max) seconds; None: blacklisted for good

    def __post_init__(self) -> None:
        if self.reset_limit is not None and self.reset_limit < 0:
            raise LaunchConfigError(f"--reset-limit {self.reset_limit}: need 0 or more")
        if self.blacklist_cooldown is not None:
            low, high = self.blacklist_cooldown
            if not 0 < low <= high:
                raise LaunchConfigError(f"--blacklist-cooldown-range {low:g} {high:g}: need 0 < MIN <= MAX (seconds)")

    def cooldown(self, times: int) -> float:
        """Seconds a host blacklisted for the ``times``-th time stays out: MIN, doubling with
        each repeat, a little jitter (hosts that failed together return apart), at most MAX."""
        if self.blacklist_cooldown is None:
            return math.inf
        low, high = self.blacklist_cooldown
        return min(high, low * 2 ** (times - 1) + random.uniform(0, low / 4))


@dataclasses.dataclass
class _Member:
    id: str
    host: str
    slot: int
    worker: Worker
    joined_version: int  # the world it was started into
    in_world: bool = True


class ElasticDriver:
    def __init__(self, spec: WorkerSpec, elastic: ElasticSpec):
        if not 1 <= elastic.min_np <= elastic.max_np:
            raise LaunchConfigError(f"--min-np {elastic.min_np} / --max-np {elastic.max_np}: need 1 <= MIN <= MAX")
        self.spec, self.el = spec, elastic
        self.members: dict[str, _Member] = {}
        self.world: list[str] = []
        self.version = -1
        self.hosts: dict[str, int] = {}
        self.blacklist: dict[str, float] = {}  # host -> until (time.monotonic(); inf: for good)
        self._blacklisted_times: dict[str, int] = {}
        self.failures: list[Failure] = []  # failed workers (tolerated or not)
        self.transitions: list[Transition] = []
        self._next_id = 0
        self._interrupted: int | None = None
        self._short_since: float | None = None
        self._local: dict[str, bool] = {}

    def _is_local(self, host: str) -> bool:
        if host not in self._local:
            self._local[host] = is_local(host)
        return self._local[host]

    def _store_endpoint(self, hosts: dict[str, int]) -> tuple[str, str]:
        """(advertised host, bind address) of the store: loopback while every host the script
        found first is this machine, else an address of this machine the others can reach."""
        host = self.el.store_host
        if host is None and all(self._is_local(h) for h in hosts):
            return "127.0.0.1", "127.0.0.1"
        if host is None:
            host = next((h for h in hosts if self._is_local(h)), socket.gethostname())
        if not self._is_local(host) or host == "localhost" or host.startswith("127."):
            raise LaunchConfigError(
                f"the elastic driver's store cannot listen on {host}: it must be an address of this machine "
                "that the other hosts reach. HINT: pass --rdzv-endpoint ADDR:0 with such an address"
            )
        return host, socket.gethostbyname(host)

    def _on_signal(self, signum, frame) -> None:
        self._interrupted = signum

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> RunResult:
        """Blocks until the job ends; returns its exit code and the failures that ended it."""
        secret = check_secret(os.environ[SECRET], SECRET) if os.environ.get(SECRET) else new_secret()
        self.hosts = self._discover(first=True)
        self.store_host, bind = self._store_endpoint(self.hosts)
        self._errors = tempfile.mkdtemp(prefix=f"disttrain-elastic-{self.el.job_id}-")
        self.master_port = free_port(bind)
        self._forwarded = {k: v for k, v in os.environ.items() if k.startswith(FORWARD_PREFIXES) and k != SECRET}
        self._forwarded.update(self.el.env)
        in_main = threading.current_thread() is threading.main_thread()
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
        self.server = StoreServer(secret, bind, 0, advertise=self.store_host, job=self.el.job_id).start()
        self.secret = secret
        try:
            if not self._new_world("start", [], time.time()):
                return self._fail(f"the discovery script found fewer than --min-np {self.el.min_np} slots")
            return self._loop()
        finally:
            self._stop_all()
            self.server.close()
            for s, h in old.items():
                signal.signal(s, h)
            shutil.rmtree(self._errors, ignore_errors=True)

    def _loop(self) -> RunResult:
        next_discovery = time.monotonic() + self.el.discovery_interval
        while True:
            if self._interrupted is not None:
                print(f"disttrain launch: interrupted by {signal.Signals(self._interrupted).name}", file=sys.stderr)
                return RunResult(128 + self._interrupted, [], self.version)
            causes, lost, now = [], [], time.time()
            for m in self.members.values():
                code = m.worker.proc.poll() if m.worker.proc is not None else None
                if code is None or m.worker.exit_time is not None:
                    continue
                m.worker.poll()
                if not m.in_world:
                    continue
                if code == 0:
                    return self._finish()
                failure = m.worker.failure()
                self.failures.append(failure)
                lost.append(m.host)
                causes.append(f"rank {failure.rank} on {m.host} failed ({failure.how}); {self._blacklist_host(m.host)}")
                print(f"disttrain: elastic: {causes[-1]}", file=sys.stderr, flush=True)
            for host, until in list(self.blacklist.items()):
                if until <= time.monotonic():
                    del self.blacklist[host]
                    causes.append(f"host {host}'s blacklist cooldown ended")
                    print(f"disttrain: elastic: {causes[-1]}", file=sys.stderr, flush=True)
            for key, raw in self.server.keys_with_prefix("elastic/reset/").items():
                if raw == str(self.version).encode():  # a stale or garbled request is ignored
                    m = self.members.get(key.rpartition("/")[2])
                    where = f"rank {self.world.index(m.id)} on {m.host}" if m and m.id in self.world else "a worker"
                    causes.append(f"{where} asked for a new world (a collective failed)")
            if time.monotonic() >= next_discovery:
                next_discovery = time.monotonic() + self.el.discovery_interval
                hosts = self._discover()
                change = diff(self.hosts, hosts)
                if change:
                    causes.append(f"host discovery: {change.describe()}")
                    lost += [h for h in change.removed if h not in hosts]
                self.hosts = hosts
            if causes and self.el.reset_limit is not None and self.version >= self.el.reset_limit:
                return self._fail(
                    f"--reset-limit {self.el.reset_limit} reached: {self.version} new world(s) after the first, "
                    f"and one more is needed ({'; '.join(causes)})"
                )
            if causes or self._short_since is not None:
                if self._new_world("; ".join(causes) or "waiting for slots", lost, now):
                    self._short_since = None
                elif not self._usable() and all(  # as Horovod: nothing left to wait for
                    self.blacklist.get(h) == math.inf for h in self.hosts
                ):
                    return self._fail(f"every host failed or was removed (blacklisted: {sorted(self.blacklist)})")
                elif time.monotonic() - self._short_since > self.el.elastic_timeout:
                    return self._fail(
                        f"fewer than --min-np {self.el.min_np} slots for {self.el.elastic_timeout:g}s "
                        f"(hosts {self._usable() or 'none'}, blacklisted {sorted(self.blacklist) or 'none'})"
                    )
            time.sleep(0.05)

    def _discover(self, first: bool = False) -> dict[str, int]:
        try:
            hosts = self.el.discovery.find()
        except DiscoveryError as exc:
            if first:
                raise
            print(f"disttrain: elastic: {exc}; keeping the hosts found before", file=sys.stderr, flush=True)
            return self.hosts
        if not first and self.store_host.startswith("127."):
            for h in hosts:
                if not self._is_local(h):
                    print(
                        f"disttrain: elastic: host discovery found {h}, which cannot reach the store on "
                        f"{self.store_host} (the first hosts were all this machine); keeping the hosts found "
                        "before. HINT: pass --rdzv-endpoint ADDR:0 with an address of this machine",
                        file=sys.stderr,
                        flush=True,
                    )
                    return self.hosts
        return hosts

    def _usable(self) -> dict[str, int]:
        return {h: n for h, n in self.hosts.items() if h not in self.blacklist}

    def _blacklist_host(self, host: str) -> str:
        """Keep ``host`` out of new worlds (for its cooldown, or for good); says how long."""
        if host in self.blacklist:  # another of its workers failed with it
            return "host blacklisted"
        times = self._blacklisted_times[host] = self._blacklisted_times.get(host, 0) + 1
        seconds = self.el.cooldown(times)
        self.blacklist[host] = time.monotonic() + seconds
        return "host blacklisted" + (f" for {seconds:.1f}s" if seconds != math.inf else "")

    # -- worlds ---------------------------------------------------------------------------------
    def _new_world(self, cause: str, lost: list[str], detected_at: float) -> bool:
        """Publish the next world (False: fewer than min_np slots; the caller waits)."""
        hosts = self._usable()
        alive = [
            self.members[i] for i in self.world if self.members[i].worker.proc.poll() is None
        ]  # previous ranks first
        keep = [m for m in alive if m.host in hosts and m.slot < hosts[m.host]][: self.el.max_np]
        taken = {(m.host, m.slot) for m in self.members.values() if m.worker.proc.poll() is None}
        free = [(h, s) for h, n in hosts.items() for s in range(n) if (h, s) not in taken]
        free = free[: self.el.max_np - len(keep)]
        if len(keep) + len(free) < self.el.min_np:
            if self._short_since is None:
                self._short_since = time.monotonic()
                print(
                    f"disttrain: elastic: {cause}; {len(keep) + len(free)} slot(s) left, fewer than --min-np "
                    f"{self.el.min_np}; waiting up to {self.el.elastic_timeout:g}s for hosts",
                    file=sys.stderr,
                    flush=True,
                )
            return False
        before = [self.members[i] for i in self.world]
        self.version += 1
        new: list[_Member] = []
        for host, slot in free:
            worker = (  # place and env set below, once ranks are known
                Worker(self.spec, 0, 0, host, {})
                if self._is_local(host)
                else RemoteWorker(self.spec, host, self.el.ssh, self.el.stop_grace)
            )
            m = _Member(str(self._next_id), host, slot, worker, self.version)
            self._next_id += 1
            self.members[m.id] = m
            new.append(m)
        order = keep + new
        for m in self.members.values():
            m.in_world = m in order
        self.world = [m.id for m in order]
        rows = self._rows(order)
        record = {
            "version": self.version,
            "workers": rows,
            "added": bool(new) and self.version > 0,
            "removed": len(keep) < len(before) or bool(lost),
        }
        self.server.set_local(f"elastic/world/{self.version}", json.dumps(record).encode())
        for m, row, rank in zip(order, rows, range(len(order))):
            if m in new:
                self._start(m, row, rank, len(order))
        self.server.set_local("elastic/version", str(self.version).encode())
        if self.version > 0:
            t = Transition(
                round=self.version,
                cause=cause,
                lost=sorted({m.host for m in before if m not in keep} | set(lost)),
                joined=sorted({m.host for m in new}),
                world_before=len(before),
                world_after=len(order),
                detected_at=detected_at,
                seconds=time.time() - detected_at,
            )
            self.transitions.append(t)
            print(f"disttrain: elastic: {t.describe()}", file=sys.stderr, flush=True)
        return True

    def _rows(self, order: list[_Member]) -> list[dict]:
        hosts = list(dict.fromkeys(m.host for m in order))
        rows = []
        for m in order:
            same = [o for o in order if o.host == m.host]
            rows.append(
                {
                    "id": m.id,
                    "host": m.host,
                    "local_rank": same.index(m),
                    "local_size": len(same),
                    "cross_rank": hosts.index(m.host),
                    "cross_size": len(hosts),
                    "machine": _MACHINE if self._is_local(m.host) else m.host,  # one machine: workers may pick shm
                }
            )
        return rows

    def _start(self, m: _Member, row: dict, rank: int, size: int) -> None:
        place = WorkerPlace(rank, row["local_rank"], size, row["local_size"], row["cross_rank"], row["cross_size"])
        local = self._is_local(m.host)
        env = worker_env(
            place,
            job_id=self.el.job_id,
            host=m.host,
            master_addr=self.store_host,
            master_port=self.master_port,
            restart_count=0,
            max_restarts=0,
            error_file=os.path.join(self._errors, f"worker{m.id}.json") if local else "",  # none on other hosts
            store=self.server.address,
            secret=self.secret,
            base=None if local else self._forwarded,  # another host keeps its own environment
        )
        env[ELASTIC_ID] = m.id
        env["HOROVOD_ELASTIC"] = "1"
        m.worker.rank, m.worker.local_rank, m.worker.env = rank, row["local_rank"], env
        m.worker.start()

    # -- the end ----------------------------------------------------------------------------
    def _finish(self) -> RunResult:
        """A worker of the world exited 0: its world finished. Wait for the others, then stop."""
        self.server.set_local("elastic/done", b"1")
        deadline = time.monotonic() + self.el.finish_grace
        failed: list[Failure] = []
        while time.monotonic() < deadline and self._interrupted is None:
            running = False
            for m in self.members.values():
                code = m.worker.proc.poll()
                if code is None:
                    running = True
                elif m.worker.exit_time is None:
                    m.worker.poll()
                    if code != 0 and m.in_world:
                        failed.append(m.worker.failure())
            if not running:
                break
            time.sleep(0.05)
        self._report()
        if failed:
            print(format_report(failed, self.el.job_id), file=sys.stderr, flush=True)
            return RunResult(root_cause(failed).exit_code, failed, self.version)
        return RunResult(0, [], self.version)

    def _fail(self, why: str) -> RunResult:
        print(f"disttrain: elastic job {self.el.job_id} stopped: {why}", file=sys.stderr, flush=True)
        self._report()
        if self.failures:
            print(format_report(self.failures, self.el.job_id), file=sys.stderr, flush=True)
        return RunResult(1, self.failures, self.version)

    def _report(self) -> None:
        text = format_transitions(self.transitions, self.el.job_id)
        if text:
            print(text, file=sys.stderr, flush=True)

    def _stop_all(self) -> None:
        workers = [m.worker for m in self.members.values() if m.worker.proc is not None]
        for w in workers:
            if w.proc.poll() is None:
                w.stop()
        deadline = time.monotonic() + self.el.stop_grace
        while time.monotonic() < deadline and any(w.proc.poll() is None for w in workers):
            time.sleep(0.02)
        for w in workers:
            w.kill_group()
            w.proc.wait()
            w.join_output()


def run_elastic(spec: WorkerSpec, elastic: ElasticSpec) -> RunResult:
    """Run an elastic job on this machine; blocks. ``disttrain launch --min-np ...`` calls this."""
    return ElasticDriver(spec, elastic).run()
