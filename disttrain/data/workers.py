"""How a rank's DataLoader worker processes start, and what a stuck one shows.

Why not ``fork`` (torch's default on Linux): by the time a loader starts its workers the rank is
threaded (gloo's C++ threads, the flight recorder's watch, a checkpoint's commit thread, the queue
feeder of the previous loader, logging), and a fork copies every lock one of those threads holds at
that instant into a child that has no thread left to release it. Such a child waits in a futex
before it ever becomes a worker, and the rank waits for its batch forever (seen after a restart with
``data.num_workers=1``: the worker still named ``python``, in a futex). ``forkserver`` (the default
here) forks workers from a server process that was started by exec: no thread of the rank, and no
lock one of them held, ever reaches a worker. The server imports torch and the dataset's module once
(its only other thread is OpenBLAS's idle pool, which stops itself around a fork), so a worker
starts in milliseconds rather than re-importing torch. The price: the dataset and collate function
travel to the worker pickled, as under ``spawn``; one that does not pickle is named with a HINT.
``data.worker_start: fork`` keeps the old behaviour for a dataset that cannot be pickled.

The forkserver is a door: it runs the pickle a connection on its Unix socket hands it, with no
authkey. Python >= 3.10.9 / 3.11.1 binds that socket in a 0700 directory of the rank's (``pymp-*``
under ``$TMPDIR``), so no other user can connect (``tests/test_security_forkserver.py``); older ones
bind it in the abstract namespace, open to every local user (CVE-2022-42919): there workers start by
``spawn`` instead (pipes only), with a warning naming rank and host.

A forkserver's worker is the server's child, not the rank's: torch's watchdog (is my parent alive?)
and the launcher's ``PR_SET_PDEATHSIG`` do not reach it, and the server lives while any worker holds
its "alive" pipe. So a SIGKILLed rank would leave both waiting forever; each worker therefore watches
the rank that started it (a pidfd) and exits when it dies, and the server follows.

Under the launcher's hang watch (``DISTTRAIN_TRACE_DIR``) every worker registers faulthandler for
the watch's stack signal, writing into ``rank<R>.child<pid>.stacks.txt`` there: the watch signals
a hung rank's descendants that catch the signal (``launcher.hang``), so the report shows where a
stuck worker stands, in Python.
"""

from __future__ import annotations

import faulthandler
import functools
import logging
import multiprocessing
import os
import select
import socket
import sys
import threading
import types
from collections.abc import Iterator
from typing import Any, Literal

from torch.utils.data import DataLoader

from ..errors import DisttrainError

__all__ = ["WorkerStart", "loader_options", "started"]

WorkerStart = Literal["forkserver", "spawn", "fork"]
log = logging.getLogger(__name__)
_STACK_FILES: list[Any] = []  # a worker's open stacks file: faulthandler writes to its descriptor


def loader_options(num_workers: int, start: WorkerStart, *targets: Any) -> dict[str, Any]:
    """The DataLoader keywords that start ``num_workers`` workers by ``start``; ``targets`` (the
    dataset, the collate function) name the modules a forkserver imports once for all workers."""
    if num_workers == 0:
        return {"num_workers": 0}
    if start == "forkserver" and not _forkserver_socket_is_private():
        log.warning(
            "rank %s@%s: this Python (%s) binds the DataLoader forkserver's socket in the abstract namespace, where "
            "any local user could connect and run code as you (CVE-2022-42919): workers start by spawn instead\n"
            "HINT: use Python >= 3.10.9 or >= 3.11.1 to keep forkserver's fast start",
            os.environ.get("RANK", "0"), socket.gethostname(), sys.version.split()[0],
        )  # fmt: skip
        start = "spawn"
    ctx = multiprocessing.get_context(start)
    if start == "forkserver":  # effective until this process's server starts (its first worker)
        ctx.set_forkserver_preload(_preload(targets))
    started_by = functools.partial(_worker_started, rank_pid=os.getpid())
    return {"num_workers": num_workers, "multiprocessing_context": ctx, "worker_init_fn": started_by}


def _forkserver_socket_is_private() -> bool:
    """Whether multiprocessing binds a new Unix listener (the forkserver's) as a path in its 0700
    ``pymp-*`` directory, rather than in the abstract namespace (Python < 3.10.9, 3.11.0). Asks the
    function the forkserver itself calls (it makes that directory now rather than at the first worker)."""
    from multiprocessing import connection

    return not connection.arbitrary_address("AF_UNIX").startswith("\0")


def _preload(targets: tuple[Any, ...]) -> list[str]:
    """torch, the entry module (a worker re-imports it as ``__mp_main__``, as under spawn) and the
    modules of the dataset and collate function: imported once in the server, not in every worker."""
    main = getattr(sys.modules["__main__"], "__spec__", None)  # None: a script run by path, or embedded
    mods = [t.__module__ if isinstance(t, types.FunctionType) else type(t).__module__ for t in targets if t is not None]
    names = ["torch", *([main.name] if main is not None else []), *mods]
    return list(dict.fromkeys(m for m in names if m != "__main__" and not m.endswith(".__main__")))


def started(loader: DataLoader, rank: int, what: str) -> Iterator:
    """``iter(loader)``, which starts its workers: a dataset or collate function that does not pickle
    (forkserver, spawn) is a DisttrainError naming rank, host and what to change."""
    try:
        return iter(loader)
    except (AttributeError, TypeError, ValueError) as e:  # pickle's errors for local objects, locks, ...
        if "pickle" not in str(e).lower():
            raise
        ctx = loader.multiprocessing_context
        how = ctx.get_start_method() if ctx is not None else "?"
        raise DisttrainError(
            f"rank {rank}@{socket.gethostname()}: the {what} DataLoader's workers ({how}) need the dataset "
            f"and collate function pickled: {e}\nHINT: define them at module level (no lambdas, local "
            "classes or open handles), or set data.worker_start: fork (a fork of a threaded rank can "
            "deadlock), or data.num_workers: 0"
        ) from e


def _watch_rank(rank_pid: int) -> None:
    """Worker: exit as soon as the rank that started it is gone (a daemon thread blocked on its pidfd)."""
    try:
        pidfd = os.pidfd_open(rank_pid)
    except ProcessLookupError:
        os._exit(1)
    except OSError:  # no pidfd (Linux < 5.3): torch's own watchdog is all there is
        return

    def wait() -> None:
        select.select([pidfd], [], [])
        os._exit(1)

    threading.Thread(target=wait, name="rank-watch", daemon=True).start()


def _worker_started(worker_id: int, rank_pid: int = 0) -> None:
    """Each worker, first: watch the rank that started it; faulthandler's stack dump on the hang
    watch's signal, into its own file."""
    if rank_pid and rank_pid != os.getppid():  # forkserver: not our parent, so no one else watches it
        _watch_rank(rank_pid)
    directory, rank = os.environ.get("DISTTRAIN_TRACE_DIR"), os.environ.get("RANK", "0")
    if not directory or not os.path.isdir(directory) or not rank.isdigit():
        return
    from collectives.flight_recorder import STACK_SIGNAL

    path = os.path.join(directory, f"rank{rank}.child{os.getpid()}.stacks.txt")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError:
        return  # a stale name or a directory gone with the job: no stacks, the batch still comes
    _STACK_FILES[:] = [os.fdopen(fd, "w")]
    faulthandler.register(STACK_SIGNAL, file=_STACK_FILES[0], all_threads=True, chain=False)
