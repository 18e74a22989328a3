"""Rank side of tests/test_collectives_abort.py: a collective blocked on a peer that stopped taking
part is aborted from another thread, then the survivors build a smaller world in the same processes."""

from __future__ import annotations

import dataclasses
import datetime
import os
import signal
import threading
import time

import torch
import torch.distributed as dist

import collectives
from collectives import CollectiveAbortedError, PeerDiedError


def blocked_then_rebuilt(backend: str, lost: int = 2) -> dict:
    """World 3; rank ``lost`` stops taking part (alive, as behind a partition) and is SIGKILLed once the
    others were woken. The survivors' allreduce waits on it until an abort wakes it (torch: each survivor
    aborts, as each worker's watch does on the agent's word; shm: rank 0 aborts, rank 1 is woken by the
    poison in the segment); then ranks 0, 1 build a world of 2 in the same processes and allreduce on it."""
    env = collectives.read_env()
    store = dist.TCPStore(
        env.master_addr, env.master_port, env.world_size, env.rank == 0, timeout=datetime.timedelta(seconds=60)
    )
    comm = collectives.init(backend, store=dist.PrefixStore("gen0", store), env=env, timeout=60)
    comm.watch_aborts()
    t = torch.ones(8)
    comm.allreduce(t)
    assert t.eq(3).all(), t
    reason = f"rank {lost}@{env.host} lost (test)"
    if env.rank == lost:
        store.set("stuck", "1")
        store.wait(["woken/0", "woken/1"])  # both survivors are out of the old world's op
        os.kill(os.getpid(), signal.SIGKILL)
    if env.rank == 0 or backend == "torch":
        store.wait(["stuck"])

        def watch() -> None:
            time.sleep(0.5)  # the survivors are inside the allreduce by now (or enter it aborted)
            comm.abort(reason)

        threading.Thread(target=watch, daemon=True).start()
    try:
        comm.allreduce(t)
        raise AssertionError("the allreduce completed without rank 2")
    except (CollectiveAbortedError, PeerDiedError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    store.set(f"woken/{env.rank}", "1")
    comm.close()
    # The new world: same processes, new ranks and size, a fresh store namespace.
    new_env = dataclasses.replace(env, rank=env.rank, world_size=2, local_world_size=2)
    comm2 = collectives.init(backend, store=dist.PrefixStore("gen1", store), env=new_env, timeout=60)
    x = torch.full((8,), float(env.rank + 1))
    comm2.allreduce(x)
    sub = comm2.new_group([0, 1])
    sub.allreduce(x)
    comm2.barrier()
    comm2.close()
    print(f"WOKEN {error.splitlines()[0]}", flush=True)
    print(f"REBUILT world {comm2.world_size} sum {x.tolist()}", flush=True)
    return {"error": error, "sum": x.tolist(), "world": comm2.world_size}
