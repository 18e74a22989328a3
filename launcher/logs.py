"""Worker output: per-rank log files, ``[rank@host]`` console prefixes, and a stderr tail.

One thread per worker stream copies lines as they come: to the rank's file under the
log dir, to the console (prefixed, optionally filtered by rank), and into a bounded
tail kept for the failure report.

The pump never stops reading while the worker lives: a worker whose pipe is not drained
blocks in ``print`` and looks hung. So when the log file cannot take a line (a full disk,
a quota, an I/O error) the line is dropped from the file, counted, and reported on the
launcher's stderr: once when it starts, once when the file takes lines again, and with the
count when the stream ends. The console and the tail still get every line. A console that
fails is dropped the same way. Log directories are created 0700 and files 0600, with
``O_NOFOLLOW``: a symlink planted where a log goes is refused (reported, no file), never
written through.
"""

from __future__ import annotations

import collections
import os
import stat
import sys
import threading
from typing import IO

_LOG_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _say(text: str) -> None:
    try:
        sys.stderr.write(f"disttrain launcher: {text}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def open_log(path: str) -> int | None:
    """An append fd on ``path`` (created 0600), or None, reported, when it is a symlink, not a
    regular file of ours, or cannot be created."""
    try:
        fd = os.open(path, _LOG_FLAGS, 0o600)
    except OSError as exc:
        _say(
            f"cannot open the log {path} ({exc.strerror}; a symlink is not followed): this stream goes to the console only"
        )
        return None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        _say(f"the log {path} is not a regular file of ours: this stream goes to the console only")
        return None
    os.set_blocking(fd, True)
    return fd


class StreamPump(threading.Thread):
    def __init__(
        self, src: IO[bytes], prefix: str, log_path: str | None, console: IO[str] | None, tail_lines: int = 20
    ):
        super().__init__(daemon=True)
        self.src, self.prefix, self.console, self.log_path = src, prefix, console, log_path
        self.log_fd = open_log(log_path) if log_path else None
        self.tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self.dropped = 0  # lines the log file did not take
        self._failing: str | None = None

    def _to_file(self, raw: bytes) -> None:
        if self.log_fd is None:
            return
        try:
            view = memoryview(raw)
            while view:
                view = view[os.write(self.log_fd, view) :]
        except OSError as exc:
            self.dropped += 1
            if self._failing is None:
                self._failing = exc.strerror or str(exc)
                _say(
                    f"{self.prefix.strip() or 'worker'}: writing {self.log_path} failed ({self._failing}); the rank "
                    "keeps running, its lines go to the console and are dropped from the file until it takes them"
                )
            return
        if self._failing is not None:
            _say(f"{self.prefix.strip() or 'worker'}: {self.log_path} takes lines again; {self.dropped} dropped so far")
            self._failing = None

    def _to_console(self, line: str) -> None:
        if self.console is None:
            return
        try:
            self.console.write(f"{self.prefix}{line}\n")
            self.console.flush()
        except (OSError, ValueError):
            self.console = None  # keep draining the worker's pipe whatever happens to our own output

    def run(self) -> None:
        try:
            for raw in iter(self.src.readline, b""):
                self._to_file(raw)
                line = raw.decode(errors="replace").rstrip("\n")
                self.tail.append(line)
                self._to_console(line)
        except (OSError, ValueError):
            pass
        finally:
            if self.log_fd is not None:
                os.close(self.log_fd)
                self.log_fd = None
            if self.dropped:
                _say(
                    f"{self.prefix.strip() or 'worker'}: {self.dropped} line(s) of output missing from {self.log_path}"
                )


def _private_dir(path: str) -> None:
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            raise NotADirectoryError(f"{path}: exists and is not a directory (a symlink is not followed)") from None


def rank_log_paths(log_dir: str | None, rank: int) -> tuple[str | None, str | None]:
    if not log_dir:
        return None, None
    parent = os.path.dirname(os.path.abspath(log_dir))
    os.makedirs(parent, exist_ok=True)
    _private_dir(log_dir)
    d = os.path.join(log_dir, f"rank_{rank}")
    _private_dir(d)
    return os.path.join(d, "stdout.log"), os.path.join(d, "stderr.log")


def console_for(rank: int, only_ranks: set[int] | None, stream: IO[str] = sys.stdout) -> IO[str] | None:
    """The console stream for ``rank`` or None when the user filtered it out."""
    return stream if only_ranks is None or rank in only_ranks else None
