"""The ``disttrain`` command.

disttrain run configs/digits.yaml --nproc 2 train.steps=100
disttrain launch --nproc-per-node 2 train.py --lr 3e-4     # torchrun-style
disttrain launch --hosts a:2,b:2 -m disttrain.worker run.yaml   # fan out over ssh
disttrain submit configs/digits.yaml --nodes 2 --ntasks-per-node 4 [--dry-run]   # SLURM
disttrain ckpt verify|inspect|consolidate|reshard RUN_DIR ...
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys

from . import config as config_mod


def cmd_run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="disttrain run", description="Train an experiment from a YAML file.")
    p.add_argument("config", help="experiment YAML")
    p.add_argument("--nproc", type=int, default=None, help="worker processes (default: launch.nproc)")
    p.add_argument("--ranks", default=None, help="comma-separated ranks shown on the console (default: all)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.steps=100")
    ns = p.parse_intermixed_args(argv)
    overrides = list(ns.overrides) + ([f"launch.nproc={ns.nproc}"] if ns.nproc is not None else [])
    try:
        cfg = config_mod.load(ns.config, overrides)
    except config_mod.ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    from launcher.agent import NodeSpec
    from launcher.cli import launch
    from launcher.environment import free_port
    from launcher.worker import WorkerSpec

    run_dir = os.path.abspath(cfg.run.dir)
    os.makedirs(run_dir, exist_ok=True)
    resolved = os.path.join(run_dir, "config.yaml")
    cfg.run.dir = run_dir
    config_mod.save(cfg, resolved)
    print(
        f"disttrain: {cfg.run.name}: {cfg.launch.nproc} workers, backend {cfg.launch.backend}, "
        f"strategy {cfg.parallel.strategy}, run dir {run_dir}",
        flush=True,
    )
    only = frozenset(int(r) for r in ns.ranks.split(",")) if ns.ranks else None
    spec = WorkerSpec(
        entrypoint=["-m", "disttrain.worker", resolved],
        nproc=cfg.launch.nproc,
        log_dir=os.path.join(run_dir, "logs"),
        only_ranks=only,
    )
    node = NodeSpec(master_port=free_port(), job_id=f"{cfg.run.name}-{secrets.token_hex(3)}")
    hang = {"hang_timeout": cfg.launch.hang_timeout, "hang_stop": cfg.launch.hang_stop}
    return launch(spec, node, cfg.launch.max_restarts, **hang).exit_code


def cmd_launch(argv: list[str]) -> int:
    from launcher.cli import main as launch_main

    return launch_main(argv)


def cmd_ckpt(argv: list[str]) -> int:
    from .checkpoint.cli import main as ckpt_main

    return ckpt_main(argv)


def cmd_submit(argv: list[str]) -> int:
    from .slurm.submit import cmd_submit as submit_main

    return submit_main(argv)


def cmd_trace(argv: list[str]) -> int:
    from .observe.trace import main as trace_main

    return trace_main(argv)


COMMANDS = {"run": cmd_run, "launch": cmd_launch, "submit": cmd_submit, "ckpt": cmd_ckpt, "trace": cmd_trace}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip() + "\n\ncommands: " + ", ".join(COMMANDS), file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
