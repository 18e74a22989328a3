"""``disttrain launch``: torchrun's flags, horovodrun's ``-np``/``-H``, and fan-out over ssh.

    disttrain launch --nproc-per-node 4 train.py --lr 3e-4            # this machine
    disttrain launch --hosts node1:2,node2:2 train.py                  # every host, over ssh
    disttrain launch --hostfile hosts.txt --ssh-port 2222 -x NCCL_DEBUG train.py
    disttrain launch -np 4 -H node1:2,node2:2 train.py                 # horovodrun's spelling
    # torchrun style, one command per node (same DISTTRAIN_JOB_SECRET exported on each):
    disttrain launch --nnodes 2 --node-rank 0 --rdzv-endpoint node1:29400 --nproc-per-node 2 train.py
    # elastic: start on 3 hosts, go on with 2 after one is lost (resume from the latest checkpoint)
    disttrain launch --nnodes 2:3 --hosts a:2,b:2,c:2 -m disttrain.worker run.yaml
    # Horovod elastic (hvd.elastic.run): workers come and go with the script's host list
    disttrain launch --min-np 2 --max-np 4 --host-discovery-script ./hosts.sh train.py

torchrun's spellings (``--nproc_per_node``) are accepted too. Exit code: 0, the root
cause's exit code (128+signal for a killed worker), 2 for bad flags.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys

from .agent import LocalAgent
from .channel import derive_job_id
from .discovery import FixedHosts, HostDiscovery
from .driver import ElasticSpec, run_elastic
from .environment import SECRET, free_port
from .errors import LaunchConfigError, LauncherError
from .hostfile import parse_hostfile, parse_hosts
from .job import JobSpec, run_job
from .membership import HEARTBEAT_TIMEOUT, NodesRange
from .node import NodeSpec, RunResult
from .replica_store import DEFAULT_MAX_BYTES
from .ssh import SshOptions
from .store import check_secret
from .worker import WorkerSpec


def _both(parser: argparse.ArgumentParser, name: str, **kw) -> None:
    """Accept ``--foo-bar`` and torchrun's ``--foo_bar``."""
    parser.add_argument(name, name.replace("-", "_").replace("__", "--"), **kw)


def visible_gpus() -> int:
    """GPUs a worker on this host may use: CUDA_VISIBLE_DEVICES when set, else the NVIDIA driver's list
    (no CUDA initialised here: the launcher imports no torch)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and not d.strip().startswith("-")])
    try:
        return len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return 0


def nproc_arg(value: str) -> int:
    """``--nproc-per-node``: a count, ``gpu`` (one per visible GPU; none is an error) or ``auto`` (one per
    visible GPU, or 1 without one), as torchrun spells them."""
    if value in ("gpu", "auto"):
        n = visible_gpus()
        if n == 0 and value == "gpu":
            raise argparse.ArgumentTypeError(
                "gpu: no GPU visible on this host (CUDA_VISIBLE_DEVICES, /proc/driver/nvidia)"
            )
        return max(n, 1)
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, 'gpu' or 'auto', got {value!r}") from None


def build_parser(prog: str = "disttrain launch") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Start worker processes with torchrun's environment, on this machine or on many hosts over ssh.",
    )
    _both(
        p,
        "--nproc-per-node",
        type=nproc_arg,
        default=None,
        help="workers per node: N, gpu or auto (one per visible GPU); default 1, or each host's slots",
    )
    p.add_argument(
        "--nnodes",
        default=None,
        help="number of nodes, or MIN:MAX: the job starts on MAX and goes on with at least MIN after hosts are lost",
    )
    _both(p, "--node-rank", type=int, default=0, help="this node's rank (torchrun-style manual start)")
    _both(p, "--master-addr", default="127.0.0.1", help="address of the first node")
    _both(p, "--master-port", type=int, default=None, help="MASTER_PORT given to workers")
    _both(p, "--rdzv-endpoint", default=None, help="host[:port] of the job's authenticated store (default: first host)")
    _both(
        p,
        "--heartbeat-timeout",
        type=float,
        default=HEARTBEAT_TIMEOUT,
        help="seconds without a heartbeat before a host counts as lost (multi-node jobs)",
    )
    _both(
        p,
        "--replica-bytes",
        type=int,
        default=DEFAULT_MAX_BYTES,
        help="bytes of peers' in-memory state copies this host's agent holds at most (elastic jobs; 0: none)",
    )
    _both(p, "--max-restarts", type=int, default=0, help="restart the worker group this many times after a failure")
    _both(
        p,
        "--hang-timeout",
        type=float,
        default=0.0,
        help="seconds without a finished collective (our collectives) before one report names the rank "
        "behind and its line, and the job stops (default 0: off)",
    )
    _both(p, "--hang-keep-waiting", action="store_true", help="after the hang report, keep waiting (default: stop)")
    _both(p, "--log-dir", default=None, help="per-rank stdout/stderr files go under this directory")
    p.add_argument("--tee", default="3", help="kept for torchrun compatibility; output goes to files and console")
    p.add_argument("--redirects", "-r", default="0", help="0: console too; 3: files only (torchrun's meaning)")
    p.add_argument("--ranks", default=None, help="comma-separated ranks whose output reaches the console")
    _both(p, "--run-id", default=None, help="job id (default: random)")
    p.add_argument("--standalone", action="store_true", help="single node, free port (torchrun compatibility)")
    g = p.add_argument_group("hosts (fan-out over ssh)")
    g.add_argument("--hostfile", default=None, help="lines 'host slots=N'; # comments")
    g.add_argument("--hosts", "-H", default=None, help="host:slots,host:slots")
    g.add_argument("-np", "--np", dest="np", type=int, default=None, help="total workers (horovodrun's -np)")
    g.add_argument("--ssh-port", type=int, default=None)
    g.add_argument("--ssh-identity", "-i", default=None, help="ssh private key file")
    g.add_argument("--ssh-user", default=None)
    g.add_argument("--ssh-option", action="append", default=[], metavar="KEY=VALUE", help="extra ssh -o option")
    g.add_argument("--ssh-connect-timeout", type=float, default=10.0, help="seconds before a host counts unreachable")
    g.add_argument("--remote-python", default=None, help="python on the hosts (default: this interpreter's path)")
    g.add_argument("--remote-cwd", "--wdir", default=None, help="working directory on the hosts (default: this one)")
    g.add_argument(
        "-x",
        dest="env",
        action="append",
        default=[],
        metavar="NAME[=VALUE]",
        help="environment variable to set on every host (value default: this shell's)",
    )
    g.add_argument("--join-timeout", type=float, default=60.0, help="seconds for every agent to reach the store")
    e = p.add_argument_group("elastic (horovodrun's flags; launcher/driver.py)")
    e.add_argument("--host-discovery-script", default=None, help="prints the usable hosts, host[:slots] a line")
    e.add_argument("--min-np", type=int, default=None, help="fewest workers to train with (default -np, else 1)")
    e.add_argument("--max-np", type=int, default=None, help="most workers to train with (default: every slot)")
    e.add_argument("--slots", type=int, default=1, help="slots of a host the script prints without :slots")
    e.add_argument("--elastic-timeout", type=float, default=600.0, help="seconds to wait for --min-np slots")
    e.add_argument("--discovery-interval", type=float, default=1.0, help="seconds between two runs of the script")
    e.add_argument("--discovery-timeout", type=float, default=10.0, help="seconds one run of the script may take")
    e.add_argument("--reset-limit", type=int, default=None, help="new worlds allowed after the first (default: any)")
    e.add_argument(
        "--blacklist-cooldown-range",
        type=float,
        nargs=2,
        default=None,
        metavar=("MIN", "MAX"),
        help="a failed host may return after MIN seconds, doubling each time it fails again, at most MAX",
    )
    p.add_argument("-m", "--module", action="store_true", help="run the entrypoint as a module (python -m)")
    p.add_argument("entrypoint", help="script.py or module")
    p.add_argument("args", nargs=argparse.REMAINDER)
    return p


def worker_spec_from_args(ns: argparse.Namespace, nproc: int = 1) -> WorkerSpec:
    entry = (["-m", ns.entrypoint] if ns.module else [os.path.abspath(ns.entrypoint)]) + list(ns.args)
    try:
        only = frozenset(int(r) for r in ns.ranks.split(",")) if ns.ranks else None
    except ValueError:
        raise LaunchConfigError(f"--ranks {ns.ranks!r}: expected comma-separated integers, e.g. --ranks 0,3") from None
    return WorkerSpec(
        entrypoint=entry,
        nproc=nproc,
        log_dir=os.path.abspath(ns.log_dir) if ns.log_dir else None,
        only_ranks=only,
        tee=str(ns.redirects) != "3",
    )


def spec_from_args(ns: argparse.Namespace) -> tuple[WorkerSpec, NodeSpec]:
    """A single node's specs (no --hosts/--hostfile)."""
    nproc = 1 if ns.nproc_per_node is None else ns.nproc_per_node
    nodes = NodesRange.parse(ns.nnodes or 1)
    nnodes = nodes.max
    if nproc < 1:
        raise LaunchConfigError(f"--nproc-per-node must be at least 1, got {nproc}")
    if ns.heartbeat_timeout <= 0:
        raise LaunchConfigError(f"--heartbeat-timeout must be positive, got {ns.heartbeat_timeout:g}")
    if not 0 <= ns.node_rank < nnodes:
        raise LaunchConfigError(f"--node-rank {ns.node_rank} is outside --nnodes {nnodes}")
    store = None
    if nnodes > 1:
        if not ns.rdzv_endpoint:
            raise LaunchConfigError(
                "--nnodes > 1 without --hosts needs --rdzv-endpoint HOST:PORT (node 0 hosts the "
                "store there). HINT: or start every node from one place with --hosts"
            )
        if not os.environ.get("DISTTRAIN_JOB_SECRET"):
            raise LaunchConfigError(
                "a torchrun-style start of several nodes needs the same DISTTRAIN_JOB_SECRET "
                "exported on every node. HINT: export DISTTRAIN_JOB_SECRET=$(python -c "
                "'import secrets; print(secrets.token_hex(32))') on each node"
            )
    if ns.rdzv_endpoint:
        if ":" not in ns.rdzv_endpoint:
            raise LaunchConfigError(f"--rdzv-endpoint {ns.rdzv_endpoint!r} needs a port: HOST:PORT")
        store = ns.rdzv_endpoint
    spec = worker_spec_from_args(ns, nproc)
    master_addr = ns.rdzv_endpoint.rpartition(":")[0] if store else ns.master_addr
    job_id = ns.run_id or secrets.token_hex(4)
    if not ns.run_id and store and os.environ.get(SECRET):  # nodes started one by one agree on the id the
        job_id = derive_job_id(store, os.environ[SECRET])  # store's handshake checks (launcher.channel)
    node = NodeSpec(
        node_rank=ns.node_rank,
        nnodes=nnodes,
        rank_offset=ns.node_rank * nproc,
        master_addr=master_addr,
        master_port=ns.master_port or free_port(),
        job_id=job_id,
        store=store,
        host_store=store is not None and ns.node_rank == 0,
        min_nodes=nodes.min,
        heartbeat_timeout=ns.heartbeat_timeout,
        replica_bytes=ns.replica_bytes,
    )
    return spec, node


def job_from_args(ns: argparse.Namespace) -> JobSpec:
    hosts = parse_hostfile(ns.hostfile) if ns.hostfile else parse_hosts(ns.hosts, "--hosts/-H")
    if ns.hostfile and ns.hosts:
        raise LaunchConfigError("give --hostfile or --hosts, not both")
    env = _env_from_args(ns)
    job = JobSpec(
        hosts=hosts,
        np=ns.np,
        nproc_per_node=ns.nproc_per_node,
        max_restarts=ns.max_restarts,
        rdzv_endpoint=ns.rdzv_endpoint,
        master_port=ns.master_port,
        job_id=ns.run_id or secrets.token_hex(4),
        ssh=_ssh_from_args(ns),
        remote_python=ns.remote_python,
        remote_cwd=ns.remote_cwd,
        env=env,
        join_timeout=ns.join_timeout,
        heartbeat_timeout=ns.heartbeat_timeout,
        hang_timeout=ns.hang_timeout,
        hang_stop=not ns.hang_keep_waiting,
        replica_bytes=ns.replica_bytes,
    )
    if ns.heartbeat_timeout <= 0:
        raise LaunchConfigError(f"--heartbeat-timeout must be positive, got {ns.heartbeat_timeout:g}")
    if ns.nnodes is not None:
        nodes = NodesRange.parse(ns.nnodes)
        if nodes.max != len(hosts):
            raise LaunchConfigError(
                f"--nnodes {ns.nnodes} but {len(hosts)} host(s) given. HINT: leave --nnodes out, or MIN:{len(hosts)}"
            )
        job.min_nodes = nodes.min
    return job


def _env_from_args(ns: argparse.Namespace) -> dict[str, str]:
    """``-x NAME[=VALUE]``: variables sent to other hosts."""
    env = {}
    for item in ns.env:
        name, sep, value = item.partition("=")
        if not sep:
            if name not in os.environ:
                raise LaunchConfigError(f"-x {name}: not set in this shell. HINT: -x {name}=VALUE")
            value = os.environ[name]
        env[name] = value
    return env


def _ssh_from_args(ns: argparse.Namespace) -> SshOptions:
    return SshOptions(
        port=ns.ssh_port,
        identity=ns.ssh_identity,
        user=ns.ssh_user,
        connect_timeout=ns.ssh_connect_timeout,
        options=tuple(ns.ssh_option),
    )


def elastic_from_args(ns: argparse.Namespace) -> ElasticSpec:
    """``--host-discovery-script`` (hosts may come and go), or ``--min-np/--max-np`` with fixed
    ``--hosts``/``--hostfile`` (a failed worker's host leaves; the others go on)."""
    if ns.host_discovery_script and (ns.hostfile or ns.hosts):
        raise LaunchConfigError("--host-discovery-script finds the hosts: leave out --hosts/--hostfile")
    if ns.host_discovery_script:
        discovery = HostDiscovery(ns.host_discovery_script, slots_per_host=ns.slots, timeout=ns.discovery_timeout)
    elif ns.hostfile or ns.hosts:
        listed = parse_hostfile(ns.hostfile) if ns.hostfile else parse_hosts(ns.hosts, "--hosts/-H")
        discovery = FixedHosts({h.host: h.slots or ns.slots for h in listed})
    else:
        raise LaunchConfigError("--min-np/--max-np need --host-discovery-script or --hosts/--hostfile")
    min_np = ns.min_np or ns.np or 1
    return ElasticSpec(
        discovery=discovery,
        min_np=min_np,
        max_np=ns.max_np or max(min_np, 1 << 20),
        elastic_timeout=ns.elastic_timeout,
        discovery_interval=ns.discovery_interval,
        job_id=ns.run_id or secrets.token_hex(4),
        ssh=_ssh_from_args(ns),
        env=_env_from_args(ns),
        store_host=ns.rdzv_endpoint.rpartition(":")[0] or ns.rdzv_endpoint if ns.rdzv_endpoint else None,
        reset_limit=ns.reset_limit,
        blacklist_cooldown=tuple(ns.blacklist_cooldown_range) if ns.blacklist_cooldown_range else None,
    )


def launch(spec: WorkerSpec, node: NodeSpec, max_restarts: int = 0, **agent_kw) -> RunResult:
    """Run one node's worker group to completion (blocks). ``disttrain run`` calls this."""
    return LocalAgent(spec, node, max_restarts=max_restarts, **agent_kw).run()


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        if os.environ.get("DISTTRAIN_JOB_SECRET"):
            check_secret(os.environ["DISTTRAIN_JOB_SECRET"], "DISTTRAIN_JOB_SECRET")
        if ns.host_discovery_script or ns.min_np is not None or ns.max_np is not None:
            return run_elastic(worker_spec_from_args(ns), elastic_from_args(ns)).exit_code
        if ns.hostfile or ns.hosts:
            return run_job(worker_spec_from_args(ns), job_from_args(ns)).exit_code
        if ns.np is not None and ns.nproc_per_node is None:
            ns.nproc_per_node = ns.np
        spec, node = spec_from_args(ns)
        return launch(
            spec, node, ns.max_restarts, hang_timeout=ns.hang_timeout, hang_stop=not ns.hang_keep_waiting
        ).exit_code
    except LauncherError as exc:
        print(f"disttrain launch: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
