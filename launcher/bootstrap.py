"""Worker entry point: ``python -m launcher.bootstrap script.py args...`` or ``-m module args...``.

Installs the error-file hook, then runs the user's script as ``__main__`` exactly as
``python script.py`` would, so torchrun scripts run unchanged. When the launcher gave the
worker an authenticated store (``DISTTRAIN_STORE``), an import hook points torch's
``env://`` rendezvous at it the moment ``torch.distributed.rendezvous`` is imported, so
``dist.init_process_group("gloo")`` opens no unauthenticated TCPStore. The bootstrap
itself imports nothing heavy: worker start-up stays cheap.

A worker dies with its agent: the first thing the bootstrap does is ask the kernel for
SIGKILL when its parent dies (``PR_SET_PDEATHSIG``), then check that its parent is still
the agent that started it (``DISTTRAIN_AGENT_PID``), which closes the race with an agent
that died in between. So an agent killed by any signal (the OOM killer's SIGKILL
included) leaves no worker holding devices; an agent that stops normally still stops its
workers itself, with SIGTERM and a grace period.
"""

from __future__ import annotations

import os
import runpy
import sys

from . import errorfile

_RENDEZVOUS = "torch.distributed.rendezvous"


class _RendezvousHook:
    """A meta-path finder that patches torch's rendezvous module right after it loads."""

    def find_spec(self, name, path, target=None):
        if name != _RENDEZVOUS:
            return None
        sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            from .torch_store import install_env_handler

            install_env_handler(module)

        spec.loader.exec_module = exec_module
        return spec


def install_rendezvous_hook() -> None:
    if _RENDEZVOUS in sys.modules:
        from .torch_store import install_env_handler

        install_env_handler(sys.modules[_RENDEZVOUS])
    elif not any(isinstance(f, _RendezvousHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _RendezvousHook())


AGENT_PID = "DISTTRAIN_AGENT_PID"
_PR_SET_PDEATHSIG = 1


def die_with_agent() -> None:
    """SIGKILL this process when its parent (the agent) dies; exit now if it already has.

    Linux only (``prctl``); elsewhere a no-op. Without ``DISTTRAIN_AGENT_PID`` (started by
    something else than our agent) nothing is done.
    """
    agent = os.environ.pop(AGENT_PID, None)
    if not agent or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        print(f"launcher.bootstrap: prctl(PR_SET_PDEATHSIG) failed: errno {ctypes.get_errno()}", file=sys.stderr)
    if os.getppid() != int(agent):  # the agent died before prctl took effect
        print(f"launcher.bootstrap: the agent (pid {agent}) is gone; exiting", file=sys.stderr, flush=True)
        os._exit(1)


def main(argv: list[str]) -> None:
    die_with_agent()
    errorfile.install()
    if os.environ.get("DISTTRAIN_STORE") and os.environ.get("DISTTRAIN_JOB_SECRET"):
        install_rendezvous_hook()
    if not argv:
        sys.exit("usage: python -m launcher.bootstrap (script.py | -m module) [args...]")
    if argv[0] == "-m":
        sys.argv = argv[1:]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = argv
        sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
        if argv[0].endswith(".py") and os.path.isfile(argv[0]):
            _run_script(argv[0])
        else:  # a directory or zip with __main__.py
            runpy.run_path(argv[0], run_name="__main__")


def _run_script(path: str) -> None:
    """``python path.py`` semantics without runpy.run_path's imports (pkgutil, typing): cheaper start-up."""
    import types

    with open(path, "rb") as f:
        code = compile(f.read(), path, "exec", dont_inherit=True)
    main = types.ModuleType("__main__")
    main.__file__, main.__builtins__ = path, __builtins__
    sys.modules["__main__"] = main  # pickling classes defined in the script finds them here
    exec(code, main.__dict__)


if __name__ == "__main__":
    main(sys.argv[1:])
