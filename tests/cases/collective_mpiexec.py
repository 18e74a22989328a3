"""Run under ``mpiexec -n N python -m tests.cases.collective_mpiexec``: the mpi backend with
MPI's own launcher (no MASTER_ADDR, no store: we open no listener; a timeout then cannot name the missing ranks)."""

from __future__ import annotations

import torch

import collectives
from collectives import ReduceOp
from tests.cases.collective_conformance import _close, run_mismatches


def main() -> None:
    comm = collectives.init("mpi", timeout=60)
    r, w = comm.rank, comm.world_size
    assert comm.env.source == "mpi", comm.env
    t = torch.full((1000,), float(r + 1), dtype=torch.bfloat16)
    comm.allreduce(t, ReduceOp.SUM)
    _close(t, torch.full((1000,), w * (w + 1) / 2, dtype=torch.bfloat16), "bf16 allreduce")
    outs = [torch.empty(i + 1, dtype=torch.int64) for i in range(w)]
    comm.allgather(outs, torch.full((r + 1,), r, dtype=torch.int64))
    for i, o in enumerate(outs):
        _close(o, torch.full((i + 1,), i, dtype=torch.int64), "allgather unequal")
    sub = comm.split(r % 2)
    x = torch.ones(3)
    sub.allreduce(x)
    _close(x, torch.full((3,), float(sub.world_size)), "split allreduce")
    done = run_mismatches(comm) if w > 1 else []
    comm.barrier()
    comm.close()
    print(f"MPIEXEC-OK rank {r}/{w} {done}", flush=True)


if __name__ == "__main__":
    main()
