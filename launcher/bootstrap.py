"""Worker entry point: ``python -m launcher.bootstrap script.py args...`` or ``-m module args...``.

Installs the error-file hook, then runs the user's script as ``__main__`` exactly as
``python script.py`` would, so torchrun scripts run unchanged.
"""
from __future__ import annotations

import runpy
import sys

from . import errorfile


def main(argv: list[str]) -> None:
    errorfile.install()
    if not argv:
        sys.exit("usage: python -m launcher.bootstrap (script.py | -m module) [args...]")
    if argv[0] == "-m":
        sys.argv = argv[1:]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = argv
        sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(argv[0])))
        runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
