"""Rank function for tests/test_horovod_cache.py: steady and changing steps through Horovod's
response cache (``HOROVOD_CACHE_CAPACITY``). Every result is recorded exactly (values, dtype,
shape) so a job with the cache on can be compared bit for bit with one with it off."""

from __future__ import annotations

import os
import time

import torch

import disttrain.horovod as hvd


def _rec(out: list, label: str, t: torch.Tensor) -> None:
    out.append([label, str(t.dtype), list(t.shape), t.detach().reshape(-1).tolist()])


def _err(fn) -> str:
    try:
        fn()
    except hvd.HorovodInternalError as exc:
        return type(exc).__name__ + ": " + str(exc).splitlines()[0]
    return "no error"


def _hits() -> int:
    return sum(w.cache.hits for w in hvd.basics.context().engine.sets.values() if w.member)


def steps() -> dict:
    hvd.init()
    r, n = hvd.rank(), hvd.size()
    res: list = []
    errors: dict = {}
    hits: dict = {}
    try:
        # 1. tensor sets that change between steps: names come and go, one changes shape, one dtype
        for step in range(8):
            names = ["a", "b", "c"] if step % 2 == 0 else ["a", "b", "d"]
            hs = []
            for nm in names:
                size = 5 if nm == "a" and step >= 4 else 4
                dtype = torch.float64 if nm == "b" and step >= 6 else torch.float32
                t = torch.arange(size, dtype=dtype) * (r + 1) + step
                hs.append((nm, hvd.allreduce_async(t, name=f"set.{nm}", op=hvd.Sum)))
            for nm, h in hs:
                _rec(res, f"set.{nm}.{step}", hvd.synchronize(h))
            g = hvd.allgather(torch.full((r + 1 + step % 2, 2), float(r)), name="set.gather")
            _rec(res, f"set.gather.{step}", g)
            _rec(res, f"set.bcast.{step}", hvd.broadcast(torch.full((3,), float(r + step)), root_rank=n - 1, name="bc"))
        hits["sets"] = _hits()
        # 2. process sets: the same name in a set and in the global set; a set removed and added again
        for round_ in range(2):
            ps = hvd.add_process_set([0, n - 1])
            for step in range(3):
                if ps.included():
                    _rec(res, f"ps{round_}.{step}", hvd.allreduce(torch.ones(3) * (r + step), name="x", process_set=ps))
                    if round_ == 1:  # Adasum over a power-of-two set
                        t = torch.arange(4.0) * (r + 1) - step
                        _rec(res, f"adasum.{step}", hvd.allreduce(t, name="ada", op=hvd.Adasum, process_set=ps))
                _rec(res, f"global{round_}.{step}", hvd.allreduce(torch.ones(3) * (r - step), name="x"))
            hvd.remove_process_set(ps)
        # 3. DistributedOptimizer, backward_passes_per_step changing from 1 to 2 and back
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        opt = hvd.DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=model.named_parameters()
        )
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        for step in range(6):
            passes = 2 if 2 <= step < 4 else 1
            opt.set_backward_passes_per_step(passes)
            opt.zero_grad()
            for k in range(passes):
                g = torch.Generator().manual_seed(100 * step + 10 * k + r)
                model(torch.randn(4, 6, generator=g)).pow(2).mean().backward()
            opt.step()
            _rec(res, f"opt.{step}", torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
        # a steady step (its bucket hits the cache): only the rows' heads are exchanged, no announcement
        rows = hvd.basics.context().engine.sets[0].rows
        calls, sent = rows.calls, rows.bytes
        opt.zero_grad()
        model(torch.randn(4, 6, generator=torch.Generator().manual_seed(r))).pow(2).mean().backward()
        opt.step()
        steady = {"cycles": rows.calls - calls, "bytes": rows.bytes - sent, "head": 8 * rows.head_words}
        # 4. an error on one rank under a cached name: every rank raises, the next step works
        for step in range(4):
            t = torch.ones(4 + (1 if step == 2 and r == n - 1 else 0)) * (r + 1)
            errors[f"err.{step}"] = _err(lambda t=t, step=step: _rec(res, f"err.{step}", hvd.allreduce(t, name="e")))
        # 5. a cached name that one rank submits alone: the stall inspector names the others
        for step in range(2):
            _rec(res, f"stall.{step}", hvd.allreduce(torch.ones(2), name="s", op=hvd.Sum))
        if r == 0:
            errors["stall"] = _err(lambda: hvd.allreduce(torch.ones(2), name="s"))
        else:  # busy elsewhere past the stall time (an op here would wait for rank 0 and stall too)
            time.sleep(float(os.environ["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"]) + 1)
        _rec(res, "after_stall", hvd.allreduce(torch.ones(2) * r, name="after", op=hvd.Sum))
        hits["all"] = _hits()
        cache = hvd.basics.context().engine.sets[0].cache
        return {
            "res": res,
            "errors": errors,
            "hits": hits,
            "steady": steady,
            "capacity": cache.capacity,
            "cached": len(cache),
        }
    finally:
        hvd.shutdown()
