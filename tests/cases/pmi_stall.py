"""Rank functions for the PMI fault tests: an ``mpi`` job whose ``stalled`` rank stops itself
(SIGSTOP) once it is connected to the PMI server, right before MPICH's MPI_Init talks to it:
a rank hung during start-up. The others must fail, naming it, instead of waiting forever."""

from __future__ import annotations

import os
import signal

import collectives
from collectives.backends.mpi import pmi


def stop_in_mpi_init(stalled: int, timeout: float) -> dict:
    rank = int(os.environ["RANK"])
    if rank == stalled:
        connect = pmi.connect_rank

        def connect_then_stop(*args, **kwargs):
            fd = connect(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGSTOP)
            return fd

        pmi.connect_rank = connect_then_stop
    comm = collectives.init("mpi", timeout=timeout)
    comm.barrier()
    return {"rank": comm.rank}
