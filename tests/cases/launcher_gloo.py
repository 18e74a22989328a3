"""A plain torchrun-style script: ``dist.init_process_group("gloo")`` via env://, one allreduce.

Runs unchanged under torchrun and ``disttrain launch``; prints one JSON line per rank
with the sum and the kind of store torch used underneath (ours: AuthStore).
"""

import json
import os

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
t = torch.ones(4) * (dist.get_rank() + 1)
dist.all_reduce(t)
inner = dist.distributed_c10d._get_default_store()
while hasattr(inner, "underlying_store"):
    inner = inner.underlying_store
print(
    "RESULT "
    + json.dumps(
        {
            "rank": dist.get_rank(),
            "world": dist.get_world_size(),
            "sum": t.tolist(),
            "store": type(inner).__name__,
            "host": os.environ.get("DISTTRAIN_HOST"),
        }
    ),
    flush=True,
)
dist.destroy_process_group()
