"""SLURM's compressed lists, expanded: ``gpu[01-03,07],login`` and ``2(x3),1``.

Pure functions (no SLURM needed); ``scontrol_hostnames`` asks SLURM itself, for a cross-check.
"""

from __future__ import annotations

import re
import shutil
import subprocess

from .errors import SlurmEnvError

_BRACKET = re.compile(r"\[([^\[\]]*)\]")
MAX_RANGE = 100_000  # a range longer than this is a typo, not a cluster


def _split_top(s: str, sep: str = ",") -> list[str]:
    """Split at ``sep`` outside brackets."""
    out, depth, cur = [], 0, []
    for ch in s:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == sep and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out


def _expand_range(body: str, whole: str) -> list[str]:
    values = []
    for part in body.split(","):
        part = part.strip()
        lo, dash, hi = part.partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            raise SlurmEnvError(
                f"node list {whole!r}: cannot read range {part!r} in [{body}]. HINT: ranges look "
                "like node[1-4,7] or gpu[001-016]"
            )
        if not dash:
            values.append(lo)
            continue
        first, last = int(lo), int(hi)
        if last < first:
            raise SlurmEnvError(f"node list {whole!r}: range {part!r} runs backwards")
        if last - first > MAX_RANGE:
            raise SlurmEnvError(f"node list {whole!r}: range {part!r} is implausibly long")
        width = len(lo)  # SLURM pads every value to the lower bound's width: [08-10] -> 08 09 10
        values.extend(str(i).zfill(width) for i in range(first, last + 1))
    return values


def expand_hostlist(nodelist: str) -> list[str]:
    """``"gpu[01-03,07],cpu-a[1-2]b[1-2],login"`` -> the node names in SLURM's order.

    Supports several groups, ranges with zero padding, lists inside brackets and several
    bracket groups in one name (expanded like SLURM: the first bracket varies slowest).
    Raises :class:`SlurmEnvError` naming the list on anything it cannot read.
    """
    if not nodelist or not nodelist.strip():
        raise SlurmEnvError("node list is empty. HINT: run inside a SLURM allocation (srun/sbatch/salloc)")
    if nodelist.count("[") != nodelist.count("]"):
        raise SlurmEnvError(f"node list {nodelist!r}: unbalanced brackets")
    hosts: list[str] = []
    for item in _split_top(nodelist.strip()):
        item = item.strip()
        if not item:
            raise SlurmEnvError(f"node list {nodelist!r}: empty entry between commas")
        depth = 0
        for ch in item:
            depth += (ch == "[") - (ch == "]")
            if depth not in (0, 1):
                raise SlurmEnvError(f"node list {nodelist!r}: nested or stray brackets in {item!r}")
        names = [""]
        pos = 0
        for m in _BRACKET.finditer(item):
            prefix = item[pos : m.start()]
            if "[" in prefix or "]" in prefix:
                raise SlurmEnvError(f"node list {nodelist!r}: stray bracket in {item!r}")
            values = _expand_range(m.group(1), nodelist)
            names = [n + prefix + v for n in names for v in values]
            pos = m.end()
        rest = item[pos:]
        if "[" in rest or "]" in rest:
            raise SlurmEnvError(f"node list {nodelist!r}: stray bracket in {item!r}")
        hosts.extend(n + rest for n in names)
    return hosts


def scontrol_hostnames(nodelist: str, timeout: float = 10.0) -> list[str] | None:
    """``scontrol show hostnames`` (None when scontrol is not installed or fails)."""
    if shutil.which("scontrol") is None:
        return None
    try:
        proc = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=timeout
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.split() if proc.returncode == 0 else None


def expand_tasks_per_node(spec: str) -> list[int]:
    """``SLURM_TASKS_PER_NODE`` (``"2(x3),1"``) -> ``[2, 2, 2, 1]``."""
    out = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise SlurmEnvError(f"SLURM_TASKS_PER_NODE={spec!r}: cannot read {part!r}; expected e.g. 2(x3),1")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out
