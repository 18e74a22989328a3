"""``hvd.elastic.run``: run the training function again in each new world, from the committed state.

    @hvd.elastic.run
    def train(state):
        while state.epoch < epochs:
            ...
            state.commit()

    train(hvd.elastic.TorchState(model, optimizer, epoch=0))

Every rank calls the wrapped function with the same state (it blocks until training ends). The
loop, per attempt: ``state.sync()`` (rank 0's state everywhere; skipped when only hosts were
removed), then the function. A failed collective (``HorovodInternalError``: a peer died or the
transport broke) rolls back with ``state.restore()`` and asks the driver for a new world;
``HostsUpdatedInterrupt`` (raised by ``commit``) keeps the state as committed. Either way the
world is reset (``hvd.shutdown()``, then ``hvd.init()`` joins the driver's next world, or exits
0 when that world left this worker out), the reset callbacks run, and the function starts again.
Outside an elastic job (no driver) the function runs once after a ``sync()``.
"""

from __future__ import annotations

import functools
import gc
import logging

from .. import basics, rendezvous
from ..exceptions import HorovodInternalError, HostsUpdatedInterrupt
from ..optimizer import rebuild_elastic_buckets
from .state import State

log = logging.getLogger(__name__)


def reset(failed: bool = False) -> None:
    """Every rank of the old world: leave it and join the next (blocks until that world forms)."""
    if failed:
        rendezvous.request_reset()
    basics.shutdown()
    # The old world's failed ops (in tracebacks, reference cycles) hold its connections; a peer
    # still waiting on one of them learns that the world is gone only when they close.
    gc.collect()
    basics.init()
    rebuild_elastic_buckets()  # the optimizers' gradient buckets, in the new world's buffers


def run(func):
    """Decorator: see the module doc. The first argument of ``func`` must be a :class:`State`."""

    @functools.wraps(func)
    def wrapper(state: State, *args, **kwargs):
        if not isinstance(state, State):
            raise TypeError(
                f"hvd.elastic.run: the first argument must be a hvd.elastic.State, got {type(state).__name__}"
            )
        if not rendezvous.enabled():
            state.sync()
            return func(state, *args, **kwargs)
        rendezvous.add_listener(state.on_hosts_updated)
        skip_sync = False
        try:
            while True:
                if not skip_sync:
                    state.sync()
                try:
                    return func(state, *args, **kwargs)
                except HorovodInternalError as exc:
                    log.warning(
                        "rank %d: a collective failed (%s); rolling back to the last commit",
                        basics.rank(),
                        str(exc).splitlines()[0],
                    )
                    state.restore()
                    skip_sync, failed = False, True
                except HostsUpdatedInterrupt as exc:
                    skip_sync, failed = exc.skip_sync, False
                reset(failed)  # outside the except block, so the exception and its frames are gone
                state.on_reset()
        finally:
            rendezvous.remove_listener(state.on_hosts_updated)

    return wrapper
