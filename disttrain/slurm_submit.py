"""``disttrain submit``: render an sbatch script from the config and a template, then submit it.

    disttrain submit configs/digits.yaml --nodes 2 --ntasks-per-node 4 --time 04:00:00
    disttrain submit configs/digits.yaml --nodes 1 --dry-run          # print the script only
    disttrain submit run.yaml --array 0-3 --partition gpu --gpus-per-node 8 train.steps=1000

The resolved config goes to ``RUN_DIR/config.yaml`` and the script to
``RUN_DIR/slurm/submit.sbatch`` (the run directory must be on a filesystem every node
sees). Job name, output path, requeue, the warning signal and everything else under
``slurm:`` come from the YAML; flags override it. Templates live in ``slurm/``
(``single_node``, ``multi_node``, ``job_array``) or ``slurm.template``; they use
``{{key}}`` placeholders, and a placeholder we do not provide is an error naming it.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys

from launcher.slurm import SlurmEnvError, parse_signal

from . import config as config_mod
from .errors import ConfigError

TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "slurm")
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


class SubmitError(ConfigError):
    """The job cannot be rendered or submitted (template, flags, sbatch)."""


def render(template: str, values: dict[str, str], source: str = "<template>") -> str:
    """Replace every ``{{key}}``; a key missing from ``values`` raises SubmitError with file:line."""
    missing = []
    for lineno, line in enumerate(template.splitlines(), 1):
        for m in _PLACEHOLDER.finditer(line):
            if m.group(1) not in values:
                missing.append(f"{source}:{lineno}: unknown placeholder {{{{{m.group(1)}}}}}")
    if missing:
        known = ", ".join(sorted(values))
        raise SubmitError(missing + [f"HINT: the placeholders `disttrain submit` fills are: {known}"])
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def template_path(cfg: config_mod.SlurmConfig, nodes: int) -> str:
    if cfg.template:
        return cfg.template
    kind = "job_array" if cfg.array else ("multi_node" if nodes > 1 else "single_node")
    return os.path.join(TEMPLATE_DIR, f"{kind}.sbatch")


def launch_line(cfg: config_mod.ExperimentConfig, config_path: str, ntasks_per_node: int) -> str:
    s, py = cfg.slurm, shlex.quote(sys.executable)
    if s.mode == "agent":  # one agent per node; it starts the node's workers
        return (
            f"srun --ntasks-per-node=1 --kill-on-bad-exit=1 {py} -u -m launcher.slurm_agent "
            f"--nproc-per-node {ntasks_per_node} -m {s.worker_module} {shlex.quote(config_path)}"
        )
    return f"srun --kill-on-bad-exit=1 {py} -u -m {s.worker_module} {shlex.quote(config_path)}"


def build_values(cfg: config_mod.ExperimentConfig, config_path: str, script_path: str) -> dict[str, str]:
    """Everything a template may use, from the resolved config."""
    s = cfg.slurm
    nodes = s.nodes or 1
    per_node = s.ntasks_per_node or cfg.launch.nproc
    run_dir = cfg.run.dir
    options = []
    for flag, value in (
        ("partition", s.partition),
        ("time", s.time),
        ("gpus-per-node", s.gpus_per_node),
        ("cpus-per-task", s.cpus_per_task if s.mode == "srun" else (s.cpus_per_task or per_node)),
    ):
        if value is not None:
            options.append(f"#SBATCH --{flag}={value}")
    for extra in s.extra_sbatch:
        options.append(f"#SBATCH {extra if extra.startswith('-') else '--' + extra}")
    signal_name = s.signal.upper().removeprefix("SIG")
    default_out = "%x-%A_%a.out" if s.array else "%x-%j.out"
    return {
        "job_name": s.job_name or cfg.run.name,
        "nodes": str(nodes),
        "ntasks_per_node": str(per_node if s.mode == "srun" else 1),
        "nproc_per_node": str(per_node),
        "output": s.output or os.path.join(run_dir, "slurm", default_out),
        "signal": signal_name,
        "signal_seconds": str(s.signal_seconds),
        "requeue": "--requeue" if s.requeue else "--no-requeue",
        "sbatch_options": "\n".join(options),
        "setup": "\n".join(s.setup),
        "python": shlex.quote(sys.executable),
        "config": shlex.quote(config_path),
        "run_dir": shlex.quote(run_dir),
        "script": shlex.quote(script_path),
        "array": s.array or "",
        "worker_module": s.worker_module,
        "launch": launch_line(cfg, config_path, per_node),
    }


def prepare(cfg: config_mod.ExperimentConfig) -> tuple[str, str, str]:
    """Write the resolved config; return (script text, script path, config path)."""
    try:
        parse_signal(cfg.slurm.signal)  # a bad signal name fails here, not in the job
    except SlurmEnvError as exc:
        raise SubmitError([str(exc)]) from None
    cfg.run.dir = os.path.abspath(cfg.run.dir)
    if cfg.slurm.nodes is None:
        cfg.slurm.nodes = 1
    if cfg.slurm.ntasks_per_node is None:
        cfg.slurm.ntasks_per_node = cfg.launch.nproc
    config_path = os.path.join(cfg.run.dir, "config.yaml")
    script_path = os.path.join(cfg.run.dir, "slurm", "submit.sbatch")
    tpath = template_path(cfg.slurm, cfg.slurm.nodes)
    try:
        with open(tpath) as f:
            template = f.read()
    except OSError as exc:
        raise SubmitError([f"slurm.template: cannot read {tpath} ({exc.strerror})"]) from None
    script = render(template, build_values(cfg, config_path, script_path), tpath)
    return script, script_path, config_path


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


def cmd_submit(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="disttrain submit",
        description="Render an sbatch script from an experiment and submit it (requeued and resumed after preemption).",
    )
    p.add_argument("config", help="experiment YAML")
    p.add_argument("--nodes", "-N", type=int, help="nodes (slurm.nodes)")
    p.add_argument("--ntasks-per-node", type=int, help="workers per node (slurm.ntasks_per_node; default launch.nproc)")
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
    ns = p.parse_intermixed_args(argv)  # overrides may follow flags
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
    if ns.dry_run:
        print(script, end="")
        return 0
    os.makedirs(os.path.dirname(script_path), exist_ok=True)
    config_mod.save(cfg, config_path)
    with open(script_path, "w") as f:
        f.write(script)
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
