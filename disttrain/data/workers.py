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

Under the launcher's hang watch (``DISTTRAIN_TRACE_DIR``) every worker registers faulthandler for
the watch's stack signal, writing into ``rank<R>.child<pid>.stacks.txt`` there: the watch signals
a hung rank's descendants that catch the signal (``launcher.hang``), so the report shows where a
stuck worker stands, in Python.
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import socket
import sys
import types
from collections.abc import Iterator
from typing import Any, Literal

from torch.utils.data import DataLoader

from ..errors import DisttrainError

__all__ = ["WorkerStart", "loader_options", "started"]

WorkerStart = Literal["forkserver", "spawn", "fork"]
_STACK_FILES: list[Any] = []  # a worker's open stacks file: faulthandler writes to its descriptor


def loader_options(num_workers: int, start: WorkerStart, *targets: Any) -> dict[str, Any]:
    """The DataLoader keywords that start ``num_workers`` workers by ``start``; ``targets`` (the
    dataset, the collate function) name the modules a forkserver imports once for all workers."""
    if num_workers == 0:
        return {"num_workers": 0}
    ctx = multiprocessing.get_context(start)
    if start == "forkserver":  # effective until this process's server starts (its first worker)
        ctx.set_forkserver_preload(_preload(targets))
    return {"num_workers": num_workers, "multiprocessing_context": ctx, "worker_init_fn": _worker_started}


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


def _worker_started(worker_id: int) -> None:
    """Each worker, first: faulthandler's stack dump on the hang watch's signal, into its own file."""
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
