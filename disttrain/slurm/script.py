"""sbatch scripts from a template and the config, every value quoted for where it lands.

    text, source = read_template(cfg.slurm, nodes)        # packaged, or slurm.template
    script = render(text, build_values(cfg, config_path, script_path), source)

Templates use ``{{key}}`` placeholders (:data:`PLACEHOLDERS` lists them); ``build_values``
gives each key already quoted for the place it is written to:

- ``#SBATCH`` values (job_name, output, array, partition, time): sbatch reads these lines
  with its own parser (whitespace separates arguments, ``'`` and ``"`` group, a backslash
  escapes, an unquoted ``#`` starts a comment), so a value that is not plainly safe is
  double-quoted with ``\\`` and ``"`` escaped;
- shell words (python, config, run_dir, script, worker_module, every word of launch):
  ``shlex.quote``;
- a line break or any other control character is refused in every value, wherever it
  lands: after a ``#SBATCH`` line or a comment it would begin a new line, which bash runs.

``slurm.setup`` is the one exception by intent: the user's own shell lines, run before srun.
``slurm.extra_sbatch`` items are the user's own sbatch arguments, one line each.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import sys
from importlib import resources

from launcher import SlurmEnvError, parse_signal

from ..config import ExperimentConfig, SlurmConfig, dump
from ..errors import ConfigError

TEMPLATE_KINDS = ("single_node", "multi_node", "job_array")
PLACEHOLDERS = (
    "job_name",
    "nodes",
    "ntasks_per_node",
    "nproc_per_node",
    "output",
    "signal",
    "signal_seconds",
    "requeue",
    "sbatch_options",
    "setup",
    "python",
    "config",
    "run_dir",
    "script",
    "array",
    "worker_module",
    "launch",
    "config_sha256",
)
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_SBATCH_SAFE = re.compile(r"[A-Za-z0-9_.,:/%@+=-]+")  # written as is; anything else is quoted
_MODULE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_ARRAY = re.compile(r"[0-9][0-9,:%-]*")  # 0-3, 1,3,5, 0-15:4, 0-7%2


class SubmitError(ConfigError):
    """The job cannot be rendered or submitted (template, a value, flags, sbatch)."""


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


# -- templates ------------------------------------------------------------------------------
def template_kind(cfg: SlurmConfig, nodes: int) -> str:
    return "job_array" if cfg.array is not None else ("multi_node" if nodes > 1 else "single_node")


def packaged_template(kind: str) -> str:
    """The text of a template shipped in this package (``templates/<kind>.sbatch``)."""
    if kind not in TEMPLATE_KINDS:
        raise SubmitError([f"no packaged sbatch template {kind!r}; known: {', '.join(TEMPLATE_KINDS)}"])
    try:
        return (resources.files(__package__) / "templates" / f"{kind}.sbatch").read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SubmitError(
            [
                f"the sbatch template {kind}.sbatch is missing from the installed disttrain.slurm package. "
                "HINT: reinstall disttrain (its wheel carries disttrain/slurm/templates/), or set slurm.template"
            ]
        ) from None


def read_template(cfg: SlurmConfig, nodes: int) -> tuple[str, str]:
    """(template text, where it came from): ``slurm.template`` if set, else the packaged one."""
    if cfg.template:
        try:
            with open(cfg.template, encoding="utf-8") as f:
                return f.read(), cfg.template
        except OSError as exc:
            raise SubmitError([f"slurm.template: cannot read {cfg.template} ({exc.strerror})"]) from None
    kind = template_kind(cfg, nodes)
    return packaged_template(kind), f"disttrain/slurm/templates/{kind}.sbatch"


# -- quoting --------------------------------------------------------------------------------
def one_line(key: str, value: object) -> str:
    """``str(value)``; SubmitError naming ``key`` when it holds a line break or a control character."""
    text = str(value)
    if not text.isprintable():
        bad = next(ch for ch in text if not ch.isprintable())
        raise SubmitError(
            [
                f"{key}: got {text!r}, which holds the control character {bad!r}; a line break would add "
                "a line to the batch script. HINT: use a value on one line (commands go in slurm.setup)"
            ]
        )
    return text


def sbatch_quote(key: str, value: object) -> str:
    """A value for an ``#SBATCH --opt=VALUE`` line, read back by sbatch exactly as given."""
    text = one_line(key, value)
    if _SBATCH_SAFE.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def shell_quote(key: str, value: object) -> str:
    """A value as one shell word."""
    return shlex.quote(one_line(key, value))


def launch_line(cfg: ExperimentConfig, config_path: str, ntasks_per_node: int) -> str:
    """The srun command of the job: a task per worker (srun mode) or an agent per node."""
    s, py = cfg.slurm, shell_quote("python", sys.executable)
    module, config = shell_quote("slurm.worker_module", s.worker_module), shell_quote("run.dir", config_path)
    if s.mode == "agent":  # one agent per node; it starts the node's workers and watches them for hangs
        hang = f"--hang-timeout {cfg.launch.hang_timeout:g}" + ("" if cfg.launch.hang_stop else " --hang-keep-waiting")
        return (
            f"srun --ntasks-per-node=1 --kill-on-bad-exit=1 {py} -u -m launcher.slurm.agent "
            f"--nproc-per-node {ntasks_per_node} {hang} -m {module} {config}"
        )
    return f"srun --kill-on-bad-exit=1 {py} -u -m {module} {config}"


def _check_names(s: SlurmConfig) -> None:
    if not _MODULE.fullmatch(s.worker_module):
        raise SubmitError(
            [f"slurm.worker_module: got {s.worker_module!r}, expected a module name such as disttrain.worker"]
        )
    if s.array is not None and not _ARRAY.fullmatch(str(s.array)):
        raise SubmitError([f"slurm.array: got {s.array!r}, expected an array spec such as 0-3, 1,3,5 or 0-7%2"])


def build_values(cfg: ExperimentConfig, config_path: str, script_path: str) -> dict[str, str]:
    """Everything a template may use (:data:`PLACEHOLDERS`), from the resolved config, quoted."""
    s = cfg.slurm
    _check_names(s)
    try:
        signal_name = parse_signal(s.signal).name.removeprefix("SIG")
    except SlurmEnvError as exc:
        raise SubmitError([str(exc)]) from None
    nodes = s.nodes or 1
    per_node = s.ntasks_per_node or cfg.launch.nproc
    run_dir = one_line("run.dir", cfg.run.dir)
    options = []
    for flag, value in (
        ("partition", s.partition),
        ("time", s.time),
        ("gpus-per-node", s.gpus_per_node),
        ("cpus-per-task", s.cpus_per_task if s.mode == "srun" else (s.cpus_per_task or per_node)),
    ):
        if value is not None:
            options.append(f"#SBATCH --{flag}={sbatch_quote('slurm.' + flag.replace('-', '_'), value)}")
    for i, extra in enumerate(s.extra_sbatch):
        extra = one_line(f"slurm.extra_sbatch[{i}]", extra)
        options.append(f"#SBATCH {extra if extra.startswith('-') else '--' + extra}")
    default_out = "%x-%A_%a.out" if s.array is not None else "%x-%j.out"
    values = {
        "job_name": sbatch_quote("slurm.job_name", s.job_name or cfg.run.name),
        "nodes": str(nodes),
        "ntasks_per_node": str(per_node if s.mode == "srun" else 1),
        "nproc_per_node": str(per_node),
        "output": sbatch_quote("slurm.output", s.output or os.path.join(run_dir, "slurm", default_out)),
        "signal": signal_name,
        "signal_seconds": str(s.signal_seconds),
        "requeue": "--requeue" if s.requeue else "--no-requeue",
        "sbatch_options": "\n".join(options),
        "setup": "\n".join(s.setup),  # the user's own shell lines, by intent
        "python": shell_quote("python", sys.executable),
        "config": shell_quote("run.dir", config_path),
        "run_dir": shell_quote("run.dir", run_dir),
        "script": shell_quote("run.dir", script_path),
        "array": "" if s.array is None else str(s.array),
        "worker_module": s.worker_module,
        "launch": launch_line(cfg, config_path, per_node),
        # What `disttrain submit` writes to config.yaml: workers refuse that file if it changed since.
        "config_sha256": hashlib.sha256(dump(cfg).encode()).hexdigest(),
    }
    return values
