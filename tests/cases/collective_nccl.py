import datetime
import os
import random

import torch.distributed as dist

from collectives.backends.nccl import exchange_unique_id


def unique_id_case():
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        rank == 0,
        timeout=datetime.timedelta(seconds=60),
    )
    rng = random.Random(7)

    def fake():
        return tuple(rng.randrange(-128, 128) for _ in range(128))  # the shape of cupy's ids

    uid = exchange_unique_id(store, "collectives/nccl/id/world", rank == 0, 60.0, fake)
    store.set(f"done{rank}", "1")
    store.wait([f"done{r}" for r in range(world)])
    # Rank 0 hosts the store: it leaves last, after every peer said its last word to the store.
    if rank == 0:
        store.wait([f"bye{r}" for r in range(1, world)])
    else:
        store.set(f"bye{rank}", "1")
    return list(uid)
