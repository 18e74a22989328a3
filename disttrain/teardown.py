"""How a finished training process ends: :func:`leave`, used by ``disttrain.worker`` and by the test
harness's ranks (``tests/support/rank_main``), which must end the way our workers do."""

from __future__ import annotations

import os
import sys

JOIN_TIMEOUT = 60.0  # seconds for the process's own non-daemon threads to end, all of them together


def leave(code: int) -> None:
    """End a worker whose job is done, skipping the interpreter's teardown of objects: a native
    destructor run during finalization (a thread-owning object of torch's) can abort a process that
    has already finished its work, and the job's exit code must not depend on that. What Python's
    exit does first still runs: other non-daemon threads are joined, exit hooks (MPI finalize,
    logging, weakref finalizers) run and both streams are flushed.

    MPI is finalized here when it is still up (mpi4py used directly finalizes from the C exit path,
    after the hooks above): MPICH tells its process manager that this rank finalized from
    MPI_Finalize, and hydra (mpiexec) kills every rank still running once one leaves unannounced."""
    import atexit
    import threading
    import time

    deadline = time.monotonic() + JOIN_TIMEOUT  # a thread stuck in a dead filesystem must not keep us here
    for t in threading.enumerate():
        if t is not threading.current_thread() and not t.daemon:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                print(
                    f"disttrain: thread {t.name!r} still running {JOIN_TIMEOUT:g}s after the end; leaving without it",
                    file=sys.stderr,
                    flush=True,
                )
    atexit._run_exitfuncs()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
