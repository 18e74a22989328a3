"""A finished worker leaving through ``disttrain.teardown.leave`` (as ``disttrain.worker`` does) under MPICH's mpiexec, as a worker started
by mpirun does: the mpi backend (``DISTTRAIN_CASE_RAW=1``: mpi4py alone), ranks finishing at different
times. The last rank must still get to the end: hydra SIGKILLs every rank left once one exits without
having told it, through PMI, that it finalized."""

from __future__ import annotations

import os
import time

import numpy as np
import torch

import collectives
from disttrain.teardown import leave

if os.environ.get("DISTTRAIN_CASE_RAW") == "1":
    from mpi4py import MPI

    rank, size = MPI.COMM_WORLD.rank, MPI.COMM_WORLD.size
    a = np.ones(1024, np.float32)
    MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, a)
    assert a[0] == size
else:
    comm = collectives.init("mpi", timeout=60)
    rank, size = comm.rank, comm.world_size
    t = torch.ones(4)
    comm.allreduce(t)
    assert t.tolist() == [size] * 4
if rank == size - 1:
    time.sleep(1.5)  # the others leave first
    print(f"LATE-RANK-DONE {rank}", flush=True)
leave(0)
