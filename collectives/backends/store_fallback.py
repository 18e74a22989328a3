"""The job store a backend uses when ``collectives.init`` got none: no unauthenticated door by default.

Who calls: the torch, mpi and nccl backends' ``create``, on every rank, when the caller passed
no ``store``. The launcher's store is authenticated (HMAC handshake, see ``launcher/store.py``);
``disttrain`` passes it (``launcher.torch_store.AuthStore.from_env()``). A c10d ``TCPStore``
is not: anyone who can reach its port can read and overwrite keys (the NCCL unique id, the
PMI address) or stall the job. So without a store:

* one rank: an in-process ``HashStore``;
* under torchrun with its agent store (``TORCHELASTIC_USE_AGENT_STORE=True``): connect to
  torchrun's store as a client; we open no listener (torchrun's is the user's choice);
* ``DISTTRAIN_UNAUTHENTICATED_STORE=1``: the user accepts what ``env://`` does, rank 0 hosts
  a TCPStore at MASTER_ADDR:MASTER_PORT (the test harness sets it, on loopback);
* anything else: refused with :class:`CollectivesError` and a HINT.
"""

from __future__ import annotations

import datetime
import os

from ..env import DistEnv
from ..errors import CollectivesError

OPT_IN = "DISTTRAIN_UNAUTHENTICATED_STORE"


def fallback_store(env: DistEnv, timeout: float, backend: str):
    """A torch.distributed Store for this job, or a clear refusal (see the module docstring)."""
    import torch.distributed as dist

    if env.world_size == 1:
        return dist.HashStore()
    delta = datetime.timedelta(seconds=timeout)
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    if env.master_addr is None or env.master_port is None:
        raise CollectivesError(
            f"rank {env.where}: the {backend} backend needs the job's store, and collectives.init got none "
            f"(started by {env.source}, no MASTER_ADDR/MASTER_PORT)\nHINT: start workers with `disttrain launch` "
            "and pass store=launcher.torch_store.AuthStore.from_env(), or pass any torch.distributed Store"
        )
    if agent:
        return dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=False, timeout=delta)
    if os.environ.get(OPT_IN) != "1":
        ours = " (this job has one: DISTTRAIN_STORE is set)" if os.environ.get("DISTTRAIN_STORE") else ""
        raise CollectivesError(
            f"rank {env.where}: the {backend} backend got no store and will not open an unauthenticated "
            f"TCPStore at {env.master_addr}:{env.master_port}: anyone who reaches that port could read or "
            f"change the job's keys\nHINT: pass the launcher's authenticated store{ours}, "
            "store=launcher.torch_store.AuthStore.from_env(); or set "
            f"{OPT_IN}=1 on every rank to accept an open TCPStore (as torch's env:// does)"
        )
    return dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=env.rank == 0, timeout=delta)
