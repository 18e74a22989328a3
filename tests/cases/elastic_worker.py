"""A worker for the elastic launcher tests (run by the launcher, not the harness).

    python -m launcher.cli --nnodes 2:3 ... tests/cases/elastic_worker.py STEPS LOG_DIR

Every rank joins one gloo group through the launcher's store and runs STEPS allreduces, 0.2 s
apart, printing ``step S world W`` and appending the same line to
``LOG_DIR/rank<RANK>-attempt<R>.log`` (what the partition test checks no longer grows).
"""

import datetime
import os
import sys
import time

import torch
import torch.distributed as dist

steps, log_dir = int(sys.argv[1]), sys.argv[2]
rank, attempt = os.environ["RANK"], os.environ.get("DISTTRAIN_RESTART_COUNT", "0")
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
world = dist.get_world_size()
path = os.path.join(log_dir, f"rank{rank}-attempt{attempt}.log")
for step in range(steps):
    t = torch.ones(1)
    dist.all_reduce(t)
    assert int(t.item()) == world, (t.item(), world)
    print(f"step {step} world {world} attempt {attempt}", flush=True)
    with open(path, "a") as f:
        f.write(f"step {step} world {world}\n")
    time.sleep(0.2)
dist.destroy_process_group()
