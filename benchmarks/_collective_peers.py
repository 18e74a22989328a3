"""The peers' ops for ``benchmarks/collectives.py``: each library called directly, as its users call it
(mpi4py's buffer methods on numpy arrays; torch.distributed's gloo on torch tensors). Each maker takes a
size in bytes and returns a no-argument run."""

from __future__ import annotations

import numpy as np


def mpi4py_ops(comm, world: int) -> dict:
    """mpi4py's buffer methods on numpy arrays: the raw library, as a user calls it."""
    from mpi4py import MPI

    def allreduce(nb):
        a = np.zeros(nb // 4, np.float32)
        return lambda: comm.Allreduce(MPI.IN_PLACE, a)

    def allgather(nb):
        a, out = np.zeros(nb // world // 4, np.float32), np.empty(nb // 4, np.float32)
        return lambda: comm.Allgather(a, out)

    def reduce_scatter(nb):
        a, out = np.zeros(nb // 4, np.float32), np.empty(nb // world // 4, np.float32)
        return lambda: comm.Reduce_scatter_block(a, out)

    def broadcast(nb):
        a = np.zeros(nb // 4, np.float32)
        return lambda: comm.Bcast(a, 0)

    def all_to_all(nb):
        a, out = np.zeros(nb // 4, np.float32), np.empty(nb // 4, np.float32)
        return lambda: comm.Alltoall(a, out)

    def sendrecv(nb):
        a, rank, peer = np.zeros(nb // 4, np.float32), comm.rank, 1 - comm.rank

        def there_and_back():
            if rank == 0:
                comm.Send(a, peer)
                comm.Recv(a, peer)
            elif rank == 1:
                comm.Recv(a, peer)
                comm.Send(a, peer)

        return there_and_back

    return {
        "allreduce": allreduce,
        "allgather": allgather,
        "reduce_scatter": reduce_scatter,
        "broadcast": broadcast,
        "all_to_all": all_to_all,
        "sendrecv": sendrecv,
    }


def gloo_ops(gloo, rank: int, world: int) -> dict:
    """torch.distributed's gloo called directly, on group ``gloo``."""
    import torch
    import torch.distributed as dist

    def allreduce(nb):
        t = torch.zeros(nb // 4)
        return lambda: dist.all_reduce(t, group=gloo)

    def allgather(nb):
        t, outs = torch.zeros(nb // world // 4), [torch.empty(nb // world // 4) for _ in range(world)]
        return lambda: dist.all_gather(outs, t, group=gloo)

    def broadcast(nb):
        t = torch.zeros(nb // 4)
        return lambda: dist.broadcast(t, 0, group=gloo)

    def all_to_all(nb):
        t, out = torch.zeros(nb // 4), torch.empty(nb // 4)
        return lambda: dist.all_to_all_single(out, t, group=gloo)

    def sendrecv(nb):
        t, peer = torch.zeros(nb // 4), 1 - rank

        def there_and_back():
            if rank == 0:
                dist.send(t, peer, group=gloo)
                dist.recv(t, peer, group=gloo)
            elif rank == 1:
                dist.recv(t, peer, group=gloo)
                dist.send(t, peer, group=gloo)

        return there_and_back

    # gloo: no reduce_scatter
    return {
        "allreduce": allreduce,
        "allgather": allgather,
        "broadcast": broadcast,
        "all_to_all": all_to_all,
        "sendrecv": sendrecv,
    }
