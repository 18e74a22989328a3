"""Rank functions: tensor parallel on a module whose forward reads a width from an attribute."""

from __future__ import annotations

import torch
import torch.nn as nn

import collectives
from disttrain.parallel.tensor.parallel import TPContext
from disttrain.parallel.tensor.plan import PlanError, apply_tp_plan


class Fused(nn.Module):
    """A fused projection split by a width attribute (``self.hidden``), then a row-parallel output."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.hidden = d
        self.ab = nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        a, b = self.ab(x).split(self.hidden, dim=-1)
        return self.out(a * torch.sigmoid(b))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Fused()

    def forward(self, x):
        return self.block(x)


PLAN = {"block.ab": "colwise_packed", "block.out": "rowwise"}


def width_case(divide: bool) -> dict:
    comm = collectives.init("torch", timeout=60)
    torch.manual_seed(0)
    ref = Net()
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    want = ref(x)
    torch.manual_seed(0)
    model = apply_tp_plan(
        Net(), TPContext(comm, comm.world_size, comm.rank), {**PLAN, **({"block": "divide:hidden"} if divide else {})}
    )
    try:
        got = model(x)
        out = {"max_diff": float((got - want).abs().max()), "error": None}
    except PlanError as exc:
        out = {"max_diff": None, "error": str(exc)}
    comm.barrier()
    comm.close()
    return out
