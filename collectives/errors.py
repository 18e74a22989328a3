"""The error family of the collectives package.

Every error a collective raises derives from :class:`CollectivesError`, so callers
can catch one type. Messages name the rank, the op and the call site, then a HINT.
"""

from __future__ import annotations


class CollectivesError(RuntimeError):
    """Base class of every error raised by ``collectives``."""


class BackendUnavailableError(CollectivesError):
    """A backend was named that is not registered or cannot run on this machine."""


class CollectiveMismatchError(CollectivesError):
    """Ranks called different collectives (op, shape, dtype or group) at the same sequence number."""


class CollectiveTimeoutError(CollectivesError):
    """A collective did not complete in time; the message names the ranks that never arrived."""


class PeerDiedError(CollectivesError):
    """A peer process exited or closed its transport while a collective was in flight."""


class CollectiveAbortedError(CollectivesError):
    """The communicator was aborted (``Communicator.abort``) while, or before, this op ran: the world is
    being rebuilt (a host was lost); the message carries the abort's reason (who was lost, where)."""


class InvalidTensorError(CollectivesError, ValueError):
    """A tensor argument cannot be used by this op (dtype, device, layout or size)."""
