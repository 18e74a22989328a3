"""Worker side: record an uncaught exception as JSON for the launcher's root-cause report.

torchelastic needs ``@record`` in user code; we install ``sys.excepthook`` from the
worker bootstrap instead, so user scripts need no change. The path comes from
``DISTTRAIN_ERROR_FILE`` (or torchrun's ``TORCHELASTIC_ERROR_FILE``).
"""

from __future__ import annotations

import os
import sys


def error_file_path() -> str | None:
    return os.environ.get("DISTTRAIN_ERROR_FILE") or os.environ.get("TORCHELASTIC_ERROR_FILE")


def write(exc: BaseException, path: str | None = None) -> None:
    """Write ``exc`` to the error file (first error wins; never raises)."""
    import json  # here, not at the top: every worker imports this module at start-up
    import socket
    import time
    import traceback

    path = path or error_file_path()
    if not path or os.path.exists(path):
        return
    record = {
        "rank": int(os.environ.get("RANK", "0")),
        "host": os.environ.get("DISTTRAIN_HOST") or socket.gethostname(),
        "pid": os.getpid(),
        "time": time.time(),
        "exc_type": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(type(exc), exc, _user_frames(exc.__traceback__))),
    }
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.replace(tmp, path)
    except OSError:
        pass


def _user_frames(tb):
    """Skip the bootstrap's own frames (runpy, launcher.bootstrap): the report starts in user code."""
    while tb is not None and (
        tb.tb_frame.f_code.co_filename.startswith("<frozen runpy>")
        or tb.tb_frame.f_code.co_filename.endswith(os.path.join("launcher", "bootstrap.py"))
        or tb.tb_frame.f_code.co_filename.endswith("runpy.py")
    ):
        tb = tb.tb_next
    return tb


def install() -> None:
    """Chain a ``sys.excepthook`` that writes the error file, then prints as usual."""
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        if not issubclass(exc_type, KeyboardInterrupt):
            write(exc.with_traceback(tb))
        previous(exc_type, exc, tb)

    sys.excepthook = hook


def read(path: str) -> dict | None:
    import json

    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
