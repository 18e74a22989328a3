import datetime
import os
import random

import torch.distributed as dist

from collectives.backends.nccl import exchange_unique_id


def unique_id_case():
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, rank == 0,
                          timeout=datetime.timedelta(seconds=60))
    rng = random.Random(7)
    fake = lambda: tuple(rng.randrange(-128, 128) for _ in range(128))  # the shape of cupy's ids
    uid = exchange_unique_id(store, "collectives/nccl/id/world", rank == 0, 60.0, fake)
    store.set(f"done{rank}", "1")
    store.wait([f"done{r}" for r in range(world)])  # keep rank 0's store up until all have read
    return list(uid)
