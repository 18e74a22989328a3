"""``disttrain submit``: render an sbatch script from the config and a template, then submit it.

    disttrain submit configs/digits.yaml --nodes 2 --ntasks-per-node 4 --time 04:00:00
    disttrain submit configs/digits.yaml --nodes 1 --dry-run          # print the script only
    disttrain submit run.yaml --array 0-3 --partition gpu --gpus-per-node 8 train.steps=1000

The resolved config goes to ``RUN_DIR/config.yaml`` and the script to
``RUN_DIR/slurm/submit.sbatch`` (the run directory must be on a filesystem every node
sees). Job name, output path, requeue, the warning signal and everything else under
``slurm:`` come from the YAML; flags override it. The templates ship in this package
(``single_node``, ``multi_node``, ``job_array``; see :mod:`disttrain.slurm.script`), or
``slurm.template`` names your own; a placeholder we do not provide is an error naming it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from .. import config as config_mod
from .. import rundir
from ..errors import ConfigError
from .script import SubmitError, build_values, read_template, render


def prepare(cfg: config_mod.ExperimentConfig) -> tuple[str, str, str]:
    """Resolve the config's SLURM defaults; return (script text, script path, config path). Writes nothing."""
    cfg.run.dir = os.path.abspath(cfg.run.dir)
    if cfg.slurm.nodes is None:
        cfg.slurm.nodes = 1
    if cfg.slurm.ntasks_per_node is None:  # one worker per GPU when GPUs are asked for
        cfg.slurm.ntasks_per_node = cfg.slurm.gpus_per_node or cfg.launch.nproc
    config_path = os.path.join(cfg.run.dir, "config.yaml")
    script_path = os.path.join(cfg.run.dir, "slurm", "submit.sbatch")
    values = build_values(cfg, config_path, script_path)  # a bad value fails here, not in the job
    template, source = read_template(cfg.slurm, cfg.slurm.nodes)
    return render(template, values, source), script_path, config_path


def warnings(cfg: config_mod.ExperimentConfig) -> list[str]:
    """What about a job's resources is likely a mistake (printed, the job is still submitted)."""
    out = []
    gpus = cfg.slurm.gpus_per_node
    if gpus and cfg.launch.device == "cpu":
        out.append(
            f"warning: --gpus-per-node {gpus} with launch.device=cpu: the job trains on the CPU and leaves the "
            "GPUs idle\nHINT: launch.device=auto (or cuda)"
        )
    if gpus and cfg.slurm.ntasks_per_node and cfg.slurm.ntasks_per_node != gpus and cfg.launch.device != "cpu":
        out.append(
            f"warning: {cfg.slurm.ntasks_per_node} worker(s) per node for {gpus} GPU(s): each worker uses the GPU "
            "of its LOCAL_RANK\nHINT: --ntasks-per-node equal to --gpus-per-node (the default)"
        )
    return out


def submit(script_path: str, timeout: float = 60.0) -> str:
    """``sbatch --parsable SCRIPT`` -> the job id. Raises SubmitError with sbatch's message."""
    try:
        proc = subprocess.run(["sbatch", "--parsable", script_path], capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise SubmitError(
            ["sbatch: not found. HINT: run `disttrain submit` on a SLURM login node, or use --dry-run"]
        ) from None
    except subprocess.TimeoutExpired:
        raise SubmitError([f"sbatch {script_path}: no answer in {timeout:g}s (is slurmctld up?)"]) from None
    if proc.returncode != 0:
        raise SubmitError([f"sbatch {script_path} failed: {(proc.stderr or proc.stdout).strip()}"])
    return proc.stdout.strip().split(";")[0]


_FLAGS = (
    "nodes",
    "ntasks_per_node",
    "partition",
    "time",
    "gpus_per_node",
    "cpus_per_task",
    "array",
    "mode",
    "template",
    "job_name",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="disttrain submit",
        description="Render an sbatch script from an experiment and submit it (requeued and resumed after preemption).",
    )
    p.add_argument("config", help="experiment YAML")
    p.add_argument("--nodes", "-N", type=int, help="nodes (slurm.nodes)")
    p.add_argument(
        "--ntasks-per-node",
        type=int,
        help="workers per node (slurm.ntasks_per_node; default --gpus-per-node, else launch.nproc)",
    )
    p.add_argument("--partition", "-p", help="slurm.partition")
    p.add_argument("--time", "-t", help="time limit, e.g. 04:00:00 (slurm.time)")
    p.add_argument("--gpus-per-node", type=int, help="slurm.gpus_per_node")
    p.add_argument("--cpus-per-task", type=int, help="slurm.cpus_per_task")
    p.add_argument("--array", help="job array spec, e.g. 0-3 (slurm.array)")
    p.add_argument("--mode", choices=["srun", "agent"], help="srun: a task per worker; agent: one per node")
    p.add_argument("--template", help="custom sbatch template (slurm.template)")
    p.add_argument("--job-name", "-J", help="slurm.job_name (default run.name)")
    p.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.steps=100")
    return p


def cmd_submit(argv: list[str]) -> int:
    ns = build_parser().parse_intermixed_args(argv)  # overrides may follow flags
    overrides = list(ns.overrides)
    for name in _FLAGS:
        value = getattr(ns, name)
        if value is not None:
            overrides.append(f"slurm.{name}={value}")
    try:
        cfg = config_mod.load(ns.config, overrides)
        script, script_path, config_path = prepare(cfg)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    for line in warnings(cfg):
        print(line, file=sys.stderr)
    if ns.dry_run:
        print(script, end="")
        return 0
    try:
        rundir.prepare(cfg.run.dir, cfg.run.shared_group)
        rundir.make_dir(os.path.dirname(script_path))
    except rundir.RunDirError as exc:
        print(exc, file=sys.stderr)
        return 2
    config_mod.save(cfg, config_path)
    rundir.write_atomic(script_path, script.encode())
    try:
        job = submit(script_path)
    except SubmitError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(
        f"disttrain: submitted {cfg.slurm.job_name or cfg.run.name} as job {job}: {cfg.slurm.nodes} node(s) x "
        f"{cfg.slurm.ntasks_per_node} worker(s); run dir {cfg.run.dir}; script {script_path}",
        flush=True,
    )
    return 0
