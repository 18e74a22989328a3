"""An ``mpi``-backend job under our launcher, for the PMI attack test.

    python -m launcher.cli --nproc-per-node 3 tests/cases/security_mpi.py STEPS

Each rank meets at the launcher's store, initialises MPI through our PMI server, runs STEPS
allreduces a fifth of a second apart (a window for strangers mid-run), and prints its sums.
"""

import json
import os
import sys
import time

import torch

import collectives
from launcher.torch_store import AuthStore

steps = int(sys.argv[1])
rank = int(os.environ["RANK"])
comm = collectives.init("mpi", store=AuthStore.from_env(60), timeout=60)
sums = []
for step in range(steps):
    t = torch.full((1024,), float(rank + 1) * (step + 1))
    comm.allreduce(t)
    sums.append(float(t[0]))
    time.sleep(0.2)
comm.barrier()
print("RESULT " + json.dumps({"rank": rank, "sums": sums}), flush=True)
comm.close()
