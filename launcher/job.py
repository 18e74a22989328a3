"""One command, many hosts: the fan-out launcher.

    disttrain launch --hosts node1:2,node2:2 train.py
    disttrain launch --hostfile hosts.txt --ssh-port 2222 -x NCCL_DEBUG train.py
    disttrain launch -np 4 -H node1:2,node2:2 train.py          # horovodrun's spelling

:func:`run_job` (called by ``disttrain launch`` and ``disttrain run``, blocks) opens the
job's authenticated store on the first host (this machine), starts one agent per host (a
local subprocess for this machine, ``ssh`` for the others) with its configuration and the
secret on stdin, copies their output to the console, and waits. A failure anywhere is
handled by the agents together (see :mod:`launcher.rendezvous`); an agent that cannot be
started or that vanishes, a join timeout, or Ctrl-C stop every host: the launcher sets the
store's abort key and closes every agent's stdin. It ends with one report and the root
cause's exit code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time

from .environment import SECRET, free_port
from .errors import LaunchConfigError
from .hostfile import HostSlots, NodePlan, plan_nodes
from .logs import StreamPump
from .membership import HEARTBEAT_TIMEOUT, Transition, format_transitions
from .node import NodeSpec, RunResult
from .rendezvous import ABORT_KEY, failure_from_json
from .replica_store import DEFAULT_MAX_BYTES
from .report import format_report, root_cause
from .ssh import SshOptions, is_local, remote_command
from .store import StoreServer, check_secret, new_secret
from .worker import WorkerSpec

# Forwarded to remote agents unless the user says otherwise (local agents inherit everything).
FORWARD_PREFIXES = ("DISTTRAIN_", "NCCL_", "GLOO_", "TORCH_", "OMP_", "MKL_", "PYTHONUNBUFFERED", "PYTHONHASHSEED")


@dataclasses.dataclass
class JobSpec:
    """Where and how the job's workers run (the worker command itself is a :class:`WorkerSpec`)."""

    hosts: list[HostSlots] = dataclasses.field(default_factory=lambda: [HostSlots("localhost")])
    np: int | None = None  # total workers (horovodrun's -np)
    nproc_per_node: int | None = None  # torchrun's; default: each host's slots
    max_restarts: int = 0
    min_nodes: int | None = None  # --nnodes MIN:MAX's MIN; None: every host is needed to the end
    heartbeat_timeout: float = HEARTBEAT_TIMEOUT  # a host silent this long is lost
    rdzv_endpoint: str | None = None  # host[:port] of the store; default: first host, a free port
    master_port: int | None = None
    job_id: str = dataclasses.field(default_factory=lambda: secrets.token_hex(4))
    ssh: SshOptions = dataclasses.field(default_factory=SshOptions)
    remote_python: str | None = None  # default: this launcher's interpreter path
    remote_cwd: str | None = None  # default: this launcher's working directory
    env: dict[str, str] = dataclasses.field(default_factory=dict)  # -x NAME[=VALUE]
    join_timeout: float = 60.0  # every agent must reach the store within this
    hang_timeout: float = 0.0  # every agent's hang watch (launcher.hang_exchange); 0: off
    hang_stop: bool = True  # end the job after the hang report (False: print it and keep waiting)
    replica_bytes: int = DEFAULT_MAX_BYTES  # each agent of an elastic job holds peers' copies up to this
    stop_grace: float = 5.0


@dataclasses.dataclass
class _Agent:
    plan: NodePlan
    proc: subprocess.Popen
    local: bool
    pumps: list[StreamPump]
    exit_code: int | None = None


def _endpoint(job: JobSpec, plans: list[NodePlan]) -> tuple[str, str, int]:
    """(advertised host, bind address, port) of the store."""
    host, port = plans[0].host, 0
    if job.rdzv_endpoint:
        host, sep, p = job.rdzv_endpoint.rpartition(":")
        host, port = (host, int(p)) if sep else (job.rdzv_endpoint, 0)
    if not is_local(host):
        raise LaunchConfigError(
            f"the rendezvous store goes on {host}, but this machine is not {host}. HINT: start "
            "`disttrain launch` on the first host, or pass --rdzv-endpoint with an address of "
            "this machine that every host can reach"
        )
    remote_hosts = [p.host for p in plans if not is_local(p.host)]
    if remote_hosts and (host == "localhost" or host.startswith("127.")):
        raise LaunchConfigError(
            f"the store would listen on {host}, which {remote_hosts[0]} cannot reach. HINT: name "
            "this machine by an address the other hosts reach, or pass --rdzv-endpoint ADDR"
        )
    bind = socket.gethostbyname(host)
    return host, bind, port


def _forwarded_env(job: JobSpec) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARD_PREFIXES) and k != SECRET}
    env.update(job.env)
    return env


def _start_agent(
    spec: WorkerSpec, job: JobSpec, plan: NodePlan, node: NodeSpec, secret: str, env: dict[str, str]
) -> _Agent:
    local = is_local(plan.host)
    if local:
        argv = [sys.executable, "-u", "-m", "launcher.remote"]
        agent_spec = spec
    else:
        python = job.remote_python or sys.executable
        cwd = job.remote_cwd or spec.cwd or os.getcwd()
        argv = job.ssh.command(plan.host, remote_command(python, cwd, pythonpath=os.environ.get("PYTHONPATH")))
        agent_spec = dataclasses.replace(spec, python=python, cwd=cwd)
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        cwd=spec.cwd,
    )
    pumps = [
        StreamPump(proc.stdout, "", None, sys.stdout, tail_lines=5),
        StreamPump(proc.stderr, "", None, sys.stderr, tail_lines=20),
    ]
    for p in pumps:
        p.start()
    from . import remote  # imported here: `python -m launcher.remote` must not find it preloaded

    try:
        proc.stdin.write(
            remote.encode(
                agent_spec,
                node,
                max_restarts=job.max_restarts,
                secret=secret,
                env={} if local else env,
                stop_grace=job.stop_grace,
                hang_timeout=job.hang_timeout,
                hang_stop=job.hang_stop,
            )
        )
        proc.stdin.flush()
    except OSError:
        pass  # the agent died at once; the main loop reports it with ssh's stderr
    return _Agent(plan, proc, local, pumps)


def node_spec(
    job: JobSpec, plan: NodePlan, nnodes: int, world: int, master_addr: str, master_port: int, store: str
) -> NodeSpec:
    """What one host's agent is told of the job (sent to it on stdin by :func:`_start_agent`)."""
    return NodeSpec(
        node_rank=plan.node_rank,
        nnodes=nnodes,
        rank_offset=plan.rank_offset,
        world_size=world,
        host=plan.host,
        master_addr=master_addr,
        master_port=master_port,
        job_id=job.job_id,
        store=store,
        rdzv_timeout=job.join_timeout,
        min_nodes=job.min_nodes,
        heartbeat_timeout=job.heartbeat_timeout,
        replica_bytes=job.replica_bytes,
    )


class _Launcher:
    def __init__(self, spec: WorkerSpec, job: JobSpec):
        self.spec, self.job = spec, job
        self.plans = plan_nodes(job.hosts, np=job.np, nproc_per_node=job.nproc_per_node)
        self.agents: list[_Agent] = []
        self.errors: list[str] = []
        self.interrupted: int | None = None
        self.lost: list[_Agent] = []  # agents gone mid-job while the job may go on without them
        self._elastic = job.min_nodes is not None and job.min_nodes < len(self.plans)

    def _on_signal(self, signum, frame) -> None:
        self.interrupted = signum

    def run(self) -> RunResult:
        job, plans = self.job, self.plans
        host, bind, port = _endpoint(job, plans)
        secret = check_secret(os.environ[SECRET], SECRET) if os.environ.get(SECRET) else new_secret()
        world = sum(p.nproc for p in plans)
        master_port = job.master_port or free_port(bind)
        env = _forwarded_env(job)
        in_main = threading.current_thread() is threading.main_thread()
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
        server = StoreServer(secret, bind, port, advertise=host, job=job.job_id).start()
        try:
            for plan in plans:
                node = node_spec(job, plan, len(plans), world, host, master_port, server.address)
                self.agents.append(
                    _start_agent(dataclasses.replace(self.spec, nproc=plan.nproc), job, plan, node, secret, env)
                )
            self._wait(server)
            return self._result(server)
        finally:
            self._stop_all(server)
            server.close()
            for s, h in old.items():
                signal.signal(s, h)

    def _wait(self, server: StoreServer) -> None:
        join_deadline = time.monotonic() + self.job.join_timeout
        while True:
            if self.interrupted is not None:
                self._abort(server, f"interrupted by {signal.Signals(self.interrupted).name}")
                return
            for a in self.agents:
                if a.exit_code is None and (code := a.proc.poll()) is not None:
                    a.exit_code = code
                    if server.get_local(f"agent/result/{a.plan.node_rank}") is None:
                        if self._elastic and server.get_local(f"agent/joined/{a.plan.node_rank}") is not None:
                            self.lost.append(a)  # the agents agree whether to go on (launcher.membership)
                            print(f"disttrain launch: the agent on host {a.plan.host} is gone", file=sys.stderr)
                            continue
                        self._agent_lost(server, a)
                        return
            if all(a.exit_code is not None for a in self.agents):
                return
            if time.monotonic() > join_deadline:
                missing = [
                    a.plan.host for a in self.agents if server.get_local(f"agent/joined/{a.plan.node_rank}") is None
                ]
                if missing:
                    self.errors.append(
                        f"the agent(s) on {', '.join(missing)} did not reach the rendezvous store at "
                        f"{server.address} within {self.job.join_timeout:g}s. HINT: can those hosts "
                        f"reach {server.address}? (firewall, wrong interface)"
                    )
                    self._abort(server, "agents missing")
                    return
                join_deadline = float("inf")
            time.sleep(0.05)

    def _agent_lost(self, server: StoreServer, a: _Agent) -> None:
        for p in a.pumps:
            p.join(1.0)
        tail = [line for line in a.pumps[1].tail if line.strip()]
        last = tail[-1] if tail else "no output"
        joined = server.get_local(f"agent/joined/{a.plan.node_rank}") is not None
        how = "local agent" if a.local else "ssh"
        if not joined:
            hint = (
                "HINT: check the host name and that this works without a password: "
                + self.job.ssh.describe(a.plan.host)
                if not a.local
                else "HINT: see the output above"
            )
            self.errors.append(
                f"cannot start the agent on host {a.plan.host} ({how} exited with code {a.exit_code}: {last}). {hint}"
            )
        else:
            self.errors.append(
                f"the agent on host {a.plan.host} exited unexpectedly ({how} exit code {a.exit_code}: "
                f"{last}); stopping every host"
            )
        self._abort(server, f"agent on {a.plan.host} lost")

    def _abort(self, server: StoreServer, reason: str) -> None:
        if server.get_local(ABORT_KEY) is None:
            server.set_local(ABORT_KEY, reason.encode())

    def _stop_all(self, server: StoreServer) -> None:
        """Close every agent's stdin (their signal to stop), wait for them, then kill what is left."""
        for a in self.agents:
            try:
                a.proc.stdin.close()
            except OSError:
                pass
        deadline = time.monotonic() + self.job.stop_grace + 5.0
        for a in self.agents:
            try:
                a.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(a.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                a.proc.wait()
            for p in a.pumps:
                p.join(2.0)

    def _result(self, server: StoreServer) -> RunResult:
        final = server.get_local("agent/final_round")
        r = int(final) if final is not None else 0
        failures = [
            failure_from_json(d)
            for raw in server.keys_with_prefix(f"agent/round/{r}/failures/").values()
            for d in json.loads(raw)
        ]
        for e in self.errors:
            print(f"disttrain launch: error: {e}", file=sys.stderr, flush=True)
        raw = server.get_local("agent/transitions")
        if raw:
            moves = [Transition.from_json(line) for line in raw.decode().splitlines() if line]
            print(format_transitions(moves, self.job.job_id), file=sys.stderr, flush=True)
        if failures:
            print(format_report(failures, self.job.job_id), file=sys.stderr, flush=True)
            return RunResult(root_cause(failures).exit_code, failures, r)
        if self.interrupted is not None:
            return RunResult(128 + self.interrupted, [], r)
        if self.errors:
            return RunResult(1, [], r)
        codes = [
            int(server.get_local(f"agent/result/{a.plan.node_rank}") or 1) for a in self.agents if a not in self.lost
        ]
        return RunResult(next((c for c in codes if c), 0), [], r)


def run_job(spec: WorkerSpec, job: JobSpec) -> RunResult:
    """Run ``spec`` on every host of ``job``; blocks until done. Raises LaunchConfigError for bad plans."""
    return _Launcher(spec, job).run()
