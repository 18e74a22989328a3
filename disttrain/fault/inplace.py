"""Recovery in place (``fault_tolerance.recover: in_place``): after a host is lost the survivors' worker
processes stay; each abandons the step in flight, rebuilds its communicator, model and strategy at the
new world size and resumes from the newest complete copy in the peers' memory.

Who calls what (every rank, :mod:`disttrain.worker`'s loop): :meth:`InPlace.maybe_start` after the
session joined (declares the capability to the agent through the job store and starts the watch that
aborts the communicator when the agent ends the round); when the run raises a collective error,
:meth:`InPlace.moved` waits for the agent's word (``launcher.inplace``): True with ``os.environ`` now
holding the new place (rank, world size, attempt, replica stores), after which the worker builds a new
session in this process; False when the process must exit (the agents restart it instead, or the job
stops). The restore itself is the restart path's (``recovery``, through the checkpointer's resume), so
the data position, the global batch and the numbers are the same as after a restart.
"""

from __future__ import annotations

import logging
import os

import collectives
from collectives import CollectiveAbortedError, PeerDiedError
from launcher import RoundWatch, declare_in_place, wait_next_world

log = logging.getLogger(__name__)
# What a lost host looks like from a survivor's collective: its transport closed, or the agent ended the
# round (a peer behind a partition: the watch aborts the op). A timeout, a mismatch or a user error is not
# one: the worker exits at once, as before, rather than wait for a word no agent will send.
LOSS = (PeerDiedError, CollectiveAbortedError)


class InPlace:
    """This rank's side of one round of in-place recovery (a new one per round)."""

    def __init__(self, comm: collectives.Communicator, timeout: float):
        self.comm, self.timeout, self.rank = comm, timeout, comm.rank
        comm.watch_aborts()
        self._watch = RoundWatch(lambda cause: comm.abort(f"the round ended: {cause}"))

    @classmethod
    def maybe_start(cls, cfg, comm: collectives.Communicator) -> InPlace | None:
        """Every rank, at the start of each round: an InPlace when ``cfg.fault_tolerance.recover`` is
        in_place, the backend can abort and our launcher started this worker; else None (restart)."""
        if cfg.fault_tolerance.recover != "in_place":
            return None
        if not comm.abortable:
            log.warning(
                "rank %s: fault_tolerance.recover is in_place, but the %s backend cannot abort a pending "
                "collective; a lost host restarts the workers instead",
                comm.env.where,
                comm.backend.name,
            )
            return None
        if cfg.parallel.mesh.pp > 1 and comm.backend.name == "torch":
            # gloo's send/recv report completion only inside their blocking wait(), which an abort cannot wake:
            # the abortable wait would poll them forever (the pipeline stalled at its first recv).
            log.warning(
                "rank %s: fault_tolerance.recover is in_place, but a pipeline (parallel.mesh.pp=%d) on the torch "
                "backend sends and receives through gloo, whose send/recv cannot be waited on abortably; a lost "
                "host restarts the workers instead",
                comm.env.where,
                cfg.parallel.mesh.pp,
            )
            return None
        if not declare_in_place(comm.rank, cfg.launch.timeout):
            log.warning("rank %s: recover=in_place needs disttrain's launcher; restarting instead", comm.env.where)
            return None
        return cls(comm, cfg.launch.timeout)

    def stop(self) -> None:
        self._watch.stop()

    def moved(self, exc: BaseException) -> bool:
        """This rank, after its run raised ``exc``: True when it now belongs to the next round (the
        environment says where), False when it must exit (``exc`` is re-raised by the caller)."""
        if not isinstance(exc, LOSS):
            self.stop()
            return False
        where = self.comm.env.where
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"[{where}] in place: {first}; waiting for the new world", flush=True)
        env, cause = wait_next_world(self.rank, self.timeout)
        self.stop()
        if env is None:
            print(f"[{where}] in place: not moving ({cause}); exiting for a restart", flush=True)
            return False
        try:
            self.comm.close()
        except Exception as err:  # a group broken by the loss may not close cleanly; the new one is fresh
            log.warning("rank %s: closing the old communicator: %s", where, err)
        os.environ.update(env)
        print(
            f"[{where}] in place (pid {os.getpid()}): {cause}; now rank {env.get('RANK', self.rank)} of "
            f"{env.get('WORLD_SIZE', '?')}, attempt {env.get('DISTTRAIN_RESTART_COUNT', '?')}",
            flush=True,
        )
        return True
