"""Agent mode: one agent per node under srun; each starts its node's workers with our environment.

    srun --ntasks-per-node=1 python -m launcher.slurm.agent --nproc-per-node 4 -m disttrain.worker run.yaml
    srun --ntasks-per-node=1 python -m launcher.slurm.agent --nproc-per-node 4 train.py --lr 3e-4

Node rank, node count and the first node come from SLURM (:mod:`launcher.slurm.place`); the
agent on the first node hosts the authenticated store at a port derived from the job id,
the others join it (the job secret: ``DISTTRAIN_JOB_SECRET``, ``DISTTRAIN_JOB_SECRET_FILE``,
else a file under ``--secret-dir``, default ``$SLURM_SUBMIT_DIR``: :mod:`launcher.slurm.secret`).
Workers inherit ``SLURM_RESTART_COUNT``; ``DISTTRAIN_RESTART_COUNT`` counts the agent's own
restarts. Each agent of a job of several nodes runs a replica store for its peers' in-memory copies
(``fault_tolerance.every``; :mod:`launcher.replica_store`, its secret derived from the job secret); a
requeued job starts with new agents, so its copies are gone and it resumes from disk. The warning
signal (SIGUSR1/SIGUSR2) is passed on to the workers, which save and stop; SIGTERM stops them with ``--stop-grace`` seconds to finish their checkpoint.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from ..agent import LocalAgent
from ..errors import LauncherError
from ..membership import HEARTBEAT_TIMEOUT
from ..node import NodeSpec
from ..worker import WorkerSpec
from .place import job_tag, read_slurm_env, store_endpoint
from .secret import job_secret
from .signals import WARNING_SIGNALS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launcher.slurm.agent",
        description="Start this node's workers inside a SLURM job step (one srun task per node).",
    )
    p.add_argument("--nproc-per-node", type=int, required=True, help="workers on every node")
    p.add_argument("--max-restarts", type=int, default=0, help="restart the worker group after a failure")
    p.add_argument("--stop-grace", type=float, default=60.0, help="seconds workers get after SIGTERM to save")
    p.add_argument("--secret-dir", default=None, help="shared directory for the job secret (default $SLURM_SUBMIT_DIR)")
    p.add_argument("--log-dir", default=None, help="per-rank stdout/stderr files go under this directory")
    p.add_argument(
        "--hang-timeout",
        type=float,
        default=0.0,
        help="seconds without a finished collective before one report (from the first node) names the rank "
        "behind, its host and line, and the job stops (default 0: off)",
    )
    p.add_argument("--hang-keep-waiting", action="store_true", help="after the hang report, keep waiting")
    p.add_argument(
        "--min-nodes",
        type=int,
        default=None,
        help="after a node is lost (its agent silent for --heartbeat-timeout), the others go on while at least "
        "this many are left (torchrun's --nnodes MIN; default: all nodes, the job stops)",
    )
    p.add_argument("--heartbeat-timeout", type=float, default=HEARTBEAT_TIMEOUT, help="seconds before a node is lost")
    p.add_argument("-m", "--module", action="store_true", help="run the entrypoint as a module (python -m)")
    p.add_argument("entrypoint", help="script.py or module")
    p.add_argument("args", nargs=argparse.REMAINDER)
    return p


def main(argv: list[str] | None = None) -> int:
    # The warning signal (SLURM may send it up to a minute early, even now): workers save at an agreed step and
    # exit 0. Caught first thing, held until the agent exists, then passed on to every group it starts.
    early: list[int] = []
    started: list[LocalAgent] = []

    def forward(signum, frame):
        if started:
            started[0].forward(signum)
        elif signum not in early:
            early.append(signum)

    for s in WARNING_SIGNALS:
        signal.signal(s, forward)
    ns = build_parser().parse_args(argv)
    try:
        place = read_slurm_env()
        if place.world_size != place.nnodes:
            raise LauncherError(
                f"{place.where}: the agent wants one srun task per node, got {place.world_size} "
                f"task(s) on {place.nnodes} node(s). HINT: srun --ntasks-per-node=1"
            )
        if ns.min_nodes is not None and not 1 <= ns.min_nodes <= place.nnodes:
            raise LauncherError(
                f"{place.where}: --min-nodes {ns.min_nodes} is not between 1 and the step's {place.nnodes} node(s)"
            )
        addr, port = store_endpoint(place)
        secret, secret_path = job_secret(
            place, ns.secret_dir or os.environ.get("SLURM_SUBMIT_DIR") or os.getcwd(), place.node_rank == 0
        )
    except LauncherError as exc:
        print(f"disttrain slurm agent: error: {exc}", file=sys.stderr)
        return 2
    entry = (["-m", ns.entrypoint] if ns.module else [os.path.abspath(ns.entrypoint)]) + list(ns.args)
    spec = WorkerSpec(entrypoint=entry, nproc=ns.nproc_per_node, log_dir=ns.log_dir)
    node = NodeSpec(
        node_rank=place.node_rank,
        nnodes=place.nnodes,
        rank_offset=place.node_rank * ns.nproc_per_node,
        host=place.nodes[place.node_rank],
        master_addr=addr,
        master_port=port + 1,
        job_id=job_tag(place),
        store=f"{addr}:{port}",
        secret=secret,
        host_store=place.node_rank == 0,
        min_nodes=ns.min_nodes,
        heartbeat_timeout=ns.heartbeat_timeout,
        replica_stores=True,  # a restarted group resumes from peer memory; a requeued job's copies are gone
    )
    agent = LocalAgent(
        spec,
        node,
        max_restarts=ns.max_restarts,
        stop_grace=ns.stop_grace,
        hang_timeout=ns.hang_timeout,
        hang_stop=not ns.hang_keep_waiting,
        held_signals=WARNING_SIGNALS,
    )

    started.append(agent)
    for signum in early:  # a warning that came while this agent was setting up
        agent.forward(signum)
    try:
        return agent.run().exit_code
    finally:
        if secret_path:
            try:
                os.remove(secret_path)
            except OSError:
                pass


if __name__ == "__main__":
    sys.exit(main())
