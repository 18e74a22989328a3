"""Rank function for the Horovod rendezvous attack test: init the ``horovod`` backend, let rank 0
publish where Horovod's rendezvous listens, wait while the test attacks it, then check a
collective and a new process set (which reads the rendezvous again) still work."""

from __future__ import annotations

import os
import time

import torch

import collectives
from launcher.torch_store import AuthStore


def attacked(port_file: str, go_file: str) -> dict:
    comm = collectives.init("horovod", store=AuthStore.from_env(60), timeout=60)
    if comm.rank == 0:
        with open(port_file + ".tmp", "w") as f:
            f.write(f"{os.environ['HOROVOD_GLOO_RENDEZVOUS_ADDR']}:{os.environ['HOROVOD_GLOO_RENDEZVOUS_PORT']}")
        os.replace(port_file + ".tmp", port_file)
    deadline = time.monotonic() + 60
    while not os.path.exists(go_file) and time.monotonic() < deadline:
        time.sleep(0.05)
    t = torch.full((4,), float(comm.rank + 1))
    comm.allreduce(t)
    sub = comm.new_group(list(range(comm.world_size)))
    s = torch.ones(2)
    sub.allreduce(s)
    comm.barrier()
    return {"sum": t.tolist(), "sub": s.tolist()}
