"""Worker output: per-rank log files, ``[rank@host]`` console prefixes, and a stderr tail.

One thread per worker stream copies lines as they come: to the rank's file under the
log dir, to the console (prefixed, optionally filtered by rank), and into a bounded
tail kept for the failure report.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
from typing import IO


class StreamPump(threading.Thread):
    def __init__(
        self, src: IO[bytes], prefix: str, log_path: str | None, console: IO[str] | None, tail_lines: int = 20
    ):
        super().__init__(daemon=True)
        self.src, self.prefix, self.console = src, prefix, console
        self.log = open(log_path, "ab") if log_path else None
        self.tail: collections.deque[str] = collections.deque(maxlen=tail_lines)

    def run(self) -> None:
        try:
            for raw in iter(self.src.readline, b""):
                if self.log:
                    self.log.write(raw)
                    self.log.flush()
                line = raw.decode(errors="replace").rstrip("\n")
                self.tail.append(line)
                if self.console is not None:
                    self.console.write(f"{self.prefix}{line}\n")
                    self.console.flush()
        except (OSError, ValueError):
            pass
        finally:
            if self.log:
                self.log.close()


def rank_log_paths(log_dir: str | None, rank: int) -> tuple[str | None, str | None]:
    if not log_dir:
        return None, None
    d = os.path.join(log_dir, f"rank_{rank}")
    os.makedirs(d, exist_ok=True)
    return os.path.join(d, "stdout.log"), os.path.join(d, "stderr.log")


def console_for(rank: int, only_ranks: set[int] | None, stream: IO[str] = sys.stdout) -> IO[str] | None:
    """The console stream for ``rank`` or None when the user filtered it out."""
    return stream if only_ranks is None or rank in only_ranks else None
