"""Horovod's error names, so ``except hvd.HorovodInternalError`` keeps working.

Horovod raises ``HorovodInternalError`` (a ``RuntimeError``) from ``synchronize`` when ranks
disagree about an op (shape, dtype, reduce op, root) or the transport fails. Ours carry the
cross-rank report of ``collectives`` (both sides of a mismatch, with call sites) as the message
and keep the original :class:`collectives.CollectivesError` as ``__cause__``.
"""

from __future__ import annotations

from ..errors import DisttrainError


class HorovodError(DisttrainError):
    """Base class of every error raised by ``disttrain.horovod``."""


class HorovodInternalError(HorovodError):
    """An op failed on every rank: ranks disagreed about it, or a peer or the transport failed."""


class HostsUpdatedInterrupt(HorovodError):
    """Elastic mode: the driver published a new world; raised on every rank at the same
    ``commit()`` / ``check_host_updates()``. ``skip_sync``: only hosts were removed, so the
    survivors already hold the same committed state and need no broadcast after the reset."""

    def __init__(self, skip_sync: bool = False):
        super().__init__("the job's hosts changed" + (" (removed only)" if skip_sync else ""))
        self.skip_sync = skip_sync


class NotInitializedError(HorovodError, ValueError):
    """An op was called before ``hvd.init()`` (Horovod raises ValueError here too)."""


class HorovodShutdownError(HorovodInternalError):
    """An op was submitted after, or was pending at, a shutdown (of this rank or another)."""


class DuplicateNameError(HorovodError, ValueError):
    """Two ops with one name in flight on this rank (Horovod raises ValueError at submission)."""


class ProcessSetError(HorovodError, ValueError):
    """A process set that is a duplicate, unknown, or does not include this rank."""
