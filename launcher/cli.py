"""``disttrain launch``: torchrun's flags, our agent.

    disttrain launch --nproc-per-node 4 train.py --lr 3e-4
    disttrain launch --nnodes 1 --nproc-per-node 2 --log-dir logs -m my.module

torchrun's spellings (``--nproc_per_node``) are accepted too.
"""
from __future__ import annotations

import argparse
import os
import secrets
import sys

from .agent import LocalAgent, NodeSpec, RunResult
from .environment import free_port
from .errors import LaunchConfigError
from .worker import WorkerSpec


def _both(parser: argparse.ArgumentParser, name: str, **kw) -> None:
    """Accept ``--foo-bar`` and torchrun's ``--foo_bar``."""
    parser.add_argument(name, name.replace("-", "_").replace("__", "--"), **kw)


def build_parser(prog: str = "disttrain launch") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Start worker processes with torchrun's environment.")
    _both(p, "--nproc-per-node", type=int, default=1, help="workers on this node")
    p.add_argument("--nnodes", type=int, default=1, help="number of nodes")
    _both(p, "--node-rank", type=int, default=0, help="this node's rank")
    _both(p, "--master-addr", default="127.0.0.1", help="address of the first node")
    _both(p, "--master-port", type=int, default=None, help="port for the job's process-group bootstrap")
    _both(p, "--max-restarts", type=int, default=0, help="restart the worker group this many times after a failure")
    _both(p, "--log-dir", default=None, help="per-rank stdout/stderr files go under this directory")
    p.add_argument("--tee", default="3", help="kept for torchrun compatibility; output always goes to files and console")
    p.add_argument("--redirects", "-r", default="0", help="0: console too; 3: files only (torchrun's meaning)")
    p.add_argument("--ranks", default=None, help="comma-separated ranks whose output reaches the console")
    _both(p, "--run-id", default=None, help="job id (default: random)")
    p.add_argument("--standalone", action="store_true", help="single node, free port (torchrun compatibility)")
    p.add_argument("-m", "--module", action="store_true", help="run the entrypoint as a module (python -m)")
    p.add_argument("entrypoint", help="script.py or module")
    p.add_argument("args", nargs=argparse.REMAINDER)
    return p


def spec_from_args(ns: argparse.Namespace) -> tuple[WorkerSpec, NodeSpec]:
    if ns.nproc_per_node < 1:
        raise LaunchConfigError(f"--nproc-per-node must be at least 1, got {ns.nproc_per_node}")
    if not 0 <= ns.node_rank < ns.nnodes:
        raise LaunchConfigError(f"--node-rank {ns.node_rank} is outside --nnodes {ns.nnodes}")
    entry = (["-m", ns.entrypoint] if ns.module else [os.path.abspath(ns.entrypoint)]) + list(ns.args)
    only = frozenset(int(r) for r in ns.ranks.split(",")) if ns.ranks else None
    spec = WorkerSpec(entrypoint=entry, nproc=ns.nproc_per_node, log_dir=ns.log_dir, only_ranks=only,
                      tee=str(ns.redirects) != "3")
    node = NodeSpec(node_rank=ns.node_rank, nnodes=ns.nnodes, rank_offset=ns.node_rank * ns.nproc_per_node,
                    master_addr=ns.master_addr, master_port=ns.master_port or free_port(),
                    job_id=ns.run_id or secrets.token_hex(4))
    return spec, node


def launch(spec: WorkerSpec, node: NodeSpec, max_restarts: int = 0) -> RunResult:
    """Run one node's worker group to completion (blocks)."""
    return LocalAgent(spec, node, max_restarts=max_restarts).run()


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        spec, node = spec_from_args(ns)
    except LaunchConfigError as exc:
        print(f"disttrain launch: error: {exc}", file=sys.stderr)
        return 2
    return launch(spec, node, ns.max_restarts).exit_code


if __name__ == "__main__":
    sys.exit(main())
