"""The `disttrain` command: one verb per job a user has, each with its own `--help`.

    disttrain run configs/digits.yaml --nproc 2 train.steps=100
    disttrain launch --nproc-per-node 2 train.py --lr 3e-4             # torchrun-style
    disttrain launch --hosts a:2,b:2 -m disttrain.worker run.yaml      # fan out over ssh
    disttrain submit configs/digits.yaml --nodes 2 --ntasks-per-node 4 --dry-run   # SLURM
    disttrain ckpt verify RUN_DIR                                      # and inspect, consolidate, export, reshard

Exit codes follow argparse: 2 for an unknown command, a bad flag or a config that does not validate.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys

from . import __version__, rundir
from . import config as config_mod

EXAMPLES = """\
examples:
  disttrain run configs/digits.yaml --nproc 2 train.steps=100 optim.lr=1e-3
  disttrain launch --nproc-per-node 2 train.py --lr 3e-4
  disttrain launch --hosts node1:4,node2:4 -m disttrain.worker run.yaml
  disttrain submit configs/digits.yaml --nodes 2 --ntasks-per-node 4 --dry-run
  disttrain ckpt verify runs/digits
  disttrain ckpt export runs/gpt2 hf-model/

'disttrain COMMAND --help' describes a command's flags.
"""

# verb -> one line of help; ckpt's sub-verbs are spelled out because each is a job of its own.
VERBS = {
    "run": "train an experiment from a YAML file on this machine",
    "launch": "start any script with torchrun's environment, here or on many hosts over ssh",
    "submit": "render an sbatch script from a YAML file and submit it to SLURM (--dry-run prints it)",
    "ckpt": "look at, check and convert checkpoints: verify, inspect, consolidate, export, reshard",
}


def _nproc(value: str) -> int | None:
    """``--nproc``: a count; ``gpu``/``auto``: this host's GPUs (``auto`` without one: None, launch.nproc)."""
    if value not in ("gpu", "auto"):
        try:
            return int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, 'gpu' or 'auto', got {value!r}") from None
    import torch

    n = torch.cuda.device_count()
    if n == 0 and value == "gpu":
        raise argparse.ArgumentTypeError("gpu: no GPU visible on this host")
    return n or None


def cmd_run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="disttrain run", description="Train an experiment from a YAML file.")
    p.add_argument("config", help="experiment YAML")
    p.add_argument(
        "--nproc",
        type=_nproc,
        default=None,
        help="worker processes: N, or gpu/auto: one per visible GPU (auto without one: launch.nproc); "
        "default launch.nproc",
    )
    p.add_argument("--ranks", default=None, help="comma-separated ranks shown on the console (default: all)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.steps=100")
    ns = p.parse_intermixed_args(argv)
    overrides = list(ns.overrides) + ([f"launch.nproc={ns.nproc}"] if ns.nproc is not None else [])
    try:
        cfg = config_mod.load(ns.config, overrides)
    except config_mod.ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    from launcher import NodeSpec, WorkerSpec, free_port, launch

    try:
        run_dir = rundir.prepare(cfg.run.dir, cfg.run.shared_group)  # 0700, or refused if others can change it
    except rundir.RunDirError as exc:
        print(exc, file=sys.stderr)
        return 2
    resolved = os.path.join(run_dir, "config.yaml")
    cfg.run.dir = run_dir
    os.environ["DISTTRAIN_CONFIG_SHA256"] = config_mod.save(cfg, resolved)  # workers check it before any import
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
    from launcher import launch_main

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


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: `--version`, `--help` and the verbs. Each verb parses its own arguments."""
    p = argparse.ArgumentParser(
        prog="disttrain",
        description="Distributed training for PyTorch, from a laptop to a SLURM cluster with the same YAML.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"disttrain {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for verb, text in VERBS.items():
        sub.add_parser(verb, help=text, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a verb; returns the exit code (argparse's 2 for an unknown command or a bad flag)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    parser = build_parser()
    if not argv:
        parser.print_help(sys.stderr)
        return 2
    try:
        parser.parse_args(argv)  # --help, --version, or argparse's "invalid choice" naming the command
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
