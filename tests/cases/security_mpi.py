"""An ``mpi``-backend job under our launcher, for the PMI attack test.

    python -m launcher.cli --nproc-per-node 3 tests/cases/security_mpi.py STEPS [STOP_FILE]

Each rank meets at the launcher's store, initialises MPI through our PMI server, runs
allreduces a tenth of a second apart (a window for strangers mid-run), and prints its sums:
STEPS of them, or with STOP_FILE, until rank 0 sees that file (at most STEPS).
"""

import json
import os
import sys
import time

import torch

import collectives
from launcher.torch_store import AuthStore

steps = int(sys.argv[1])
stop_file = sys.argv[2] if len(sys.argv) > 2 else None
rank = int(os.environ["RANK"])
comm = collectives.init("mpi", store=AuthStore.from_env(60), timeout=60)
sums = []
for step in range(steps):
    t = torch.full((1024,), float(rank + 1) * (step + 1))
    comm.allreduce(t)
    sums.append(float(t[0]))
    time.sleep(0.1)
    if stop_file is not None:
        stop = torch.tensor([1.0 if rank == 0 and os.path.exists(stop_file) else 0.0])
        comm.allreduce(stop)  # every rank leaves after the same step
        if stop.item() > 0:
            break
comm.barrier()
print("RESULT " + json.dumps({"rank": rank, "sums": sums}), flush=True)
comm.close()
