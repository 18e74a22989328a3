"""One root-cause report for a failed job.

Every failed worker becomes a :class:`Failure` (host, rank, local rank, pid, exit code
or signal, time, stderr tail, traceback from its error file). The earliest is the root
cause; later ones are usually its victims (peers that saw a dead connection).
"""

from __future__ import annotations

import dataclasses
import signal
import time


@dataclasses.dataclass
class Failure:
    rank: int
    local_rank: int
    host: str
    pid: int
    returncode: int
    time: float
    stderr_tail: list[str] = dataclasses.field(default_factory=list)
    error: dict | None = None  # from the worker's error file

    @property
    def how(self) -> str:
        if self.returncode < 0:
            try:
                return f"killed by signal {signal.Signals(-self.returncode).name}"
            except ValueError:
                return f"killed by signal {-self.returncode}"
        return f"exit code {self.returncode}"

    @property
    def exit_code(self) -> int:
        """The code the launcher exits with when this is the root cause (shell convention)."""
        return 128 - self.returncode if self.returncode < 0 else self.returncode


def root_cause(failures: list[Failure]) -> Failure:
    """The first failure in time; an error file's timestamp beats the time we noticed the exit."""
    return min(failures, key=lambda f: (f.error or {}).get("time", f.time))


def _without_traceback(tail: list[str]) -> list[str]:
    """The stderr tail up to its last traceback: the error file already shows the traceback."""
    starts = [i for i, line in enumerate(tail) if line.startswith("Traceback (most recent call last)")]
    return tail[: starts[-1]] if starts else tail


def format_report(failures: list[Failure], job_id: str = "") -> str:
    if not failures:
        return ""
    root = root_cause(failures)
    ordered = [root] + sorted((f for f in failures if f is not root), key=lambda f: f.rank)
    lines = ["", "=" * 72, f"disttrain: job {job_id} FAILED: {len(failures)} worker(s) failed", "=" * 72]
    for f in ordered:
        tag = "ROOT CAUSE" if f is root else "also failed"
        when = time.strftime("%H:%M:%S", time.localtime(f.time))
        lines.append(
            f"[{tag}] rank {f.rank} (local rank {f.local_rank}) on host {f.host}, pid {f.pid}: {f.how} at {when}"
        )
        if f.error:
            lines.append(f"  error: {f.error.get('exc_type')}: {f.error.get('message')}")
            if f is root and f.error.get("traceback"):
                lines.extend("  | " + line for line in f.error["traceback"].rstrip().splitlines())
        tail = _without_traceback(f.stderr_tail) if f.error and f.error.get("traceback") else f.stderr_tail
        if tail and (f is root or not f.error):
            lines.append(
                "  last lines of stderr:" if tail is f.stderr_tail else "  last lines of stderr (before the traceback):"
            )
            lines.extend("  > " + line for line in tail)
    lines.append("=" * 72)
    return "\n".join(lines)
