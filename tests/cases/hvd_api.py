"""Rank functions for tests/test_horovod.py: Horovod's documented usage patterns, run through
``disttrain.horovod`` on every rank. ``patterns`` runs the named patterns in order in one job
(importing torch per process dominates a test's cost) and returns, per pattern, either its
result or the error it raised, so every pattern fails its own test."""

from __future__ import annotations

import copy
import json
import os
import traceback

import torch

import disttrain.horovod as hvd
from tests.cases.hvd_names import NAMED


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _data(step: int, n: int, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + step)
    return torch.randn(n, 6, generator=g), torch.randn(n, 3, generator=g)


def _maxdiff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters()))


# -- patterns --------------------------------------------------------------------------------------
def basics(**_):
    return {
        "rank": hvd.rank(),
        "size": hvd.size(),
        "local_rank": hvd.local_rank(),
        "local_size": hvd.local_size(),
        "cross_rank": hvd.cross_rank(),
        "cross_size": hvd.cross_size(),
        "init": hvd.is_initialized(),
        "gloo_built": hvd.gloo_built(),
        "mpi_built": hvd.mpi_built(),
        "homogeneous": hvd.is_homogeneous(),
    }


def training(steps: int = 4, per_rank: int = 4, **_):
    """The Horovod example: DistributedOptimizer, then broadcast of parameters and optimizer state
    from rank 0 (which 'resumed from a checkpoint'), equal to one process on the global batch."""
    W, r = hvd.size(), hvd.rank()
    model = _model(seed=100 + r)  # different on every rank until the broadcast
    opt = hvd.DistributedOptimizer(
        torch.optim.Adam(model.parameters(), lr=0.01 * (r + 1)), named_parameters=model.named_parameters()
    )
    ref = ref_opt = None
    if r == 0:  # the checkpoint: one local step of a reference run, loaded into rank 0
        ref = _model(seed=7)
        ref_opt = torch.optim.Adam(ref.parameters(), lr=0.01)
        x, y = _data(-1, 5)
        torch.nn.functional.mse_loss(ref(x), y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        model.load_state_dict(ref.state_dict())
        # deepcopy, as a checkpoint from disk would be: torch shares Adam's 'step' tensors otherwise
        opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    lr_after_broadcast = opt.param_groups[0]["lr"]
    zero_grad_kept = True  # zero_grad() means what torch says, though reduced gradients live in buckets
    for step in range(steps):
        x, y = _data(step, W * per_rank)
        lo, hi = r * per_rank, (r + 1) * per_rank
        # both ways: fresh gradients copied into the buckets, and gradients accumulated into their views
        to_none = step % 2 == 0
        opt.zero_grad(set_to_none=to_none)
        grads = [p.grad for p in model.parameters()]
        zero_grad_kept &= all(g is None for g in grads) if to_none else all(not g.any() for g in grads)
        torch.nn.functional.mse_loss(model(x[lo:hi]), y[lo:hi]).backward()
        opt.step()
        if r == 0:
            ref_opt.zero_grad()
            torch.nn.functional.mse_loss(ref(x), y).backward()
            ref_opt.step()
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = hvd.allgather(params.unsqueeze(0))
    return {
        "lr": lr_after_broadcast,
        "ranks_equal": float((gathered - gathered[0]).abs().max()),
        "vs_single": _maxdiff(model, ref) if r == 0 else 0.0,
        "zero_grad_kept": zero_grad_kept,
    }


def bpps(steps: int = 3, per_rank: int = 4, **_):
    """backward_passes_per_step=2: two half batches per step, one allreduce per step."""
    W, r = hvd.size(), hvd.rank()
    model, ref = _model(3), _model(3)
    opt = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        backward_passes_per_step=2,
        named_parameters=model.named_parameters(),
    )
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in range(steps):
        x, y = _data(10 + step, W * per_rank)
        mine_x, mine_y = x[r * per_rank : (r + 1) * per_rank], y[r * per_rank : (r + 1) * per_rank]
        opt.zero_grad()
        for hx, hy in zip(mine_x.chunk(2), mine_y.chunk(2)):
            (torch.nn.functional.mse_loss(model(hx), hy) / 2).backward()
        opt.step()
        ref_opt.zero_grad()
        torch.nn.functional.mse_loss(ref(x), y).backward()
        ref_opt.step()
    return {"vs_single": _maxdiff(model, ref)}


def fp16(**_):
    W, r = hvd.size(), hvd.rank()
    t = torch.linspace(-1, 1, 1000) * (r + 1)
    out = hvd.allreduce(t, op=hvd.Sum, compression=hvd.Compression.fp16)
    expect = torch.linspace(-1, 1, 1000) * sum(range(1, W + 1))
    model, ref = _model(5), _model(5)
    opt = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        compression=hvd.Compression.fp16,
        named_parameters=model.named_parameters(),
    )
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    x, y = _data(20, W * 4)
    torch.nn.functional.mse_loss(model(x[r * 4 : (r + 1) * 4]), y[r * 4 : (r + 1) * 4]).backward()
    opt.step()
    torch.nn.functional.mse_loss(ref(x), y).backward()
    ref_opt.step()
    return {"dtype": str(out.dtype), "err": float((out - expect).abs().max()), "vs_single": _maxdiff(model, ref)}


def async_ops(**_):
    W, r = hvd.size(), hvd.rank()
    ts = [torch.full((50 + i,), float(r + 1)) for i in range(4)]
    handles = [hvd.allreduce_async(t, name=f"t{i}", op=hvd.Sum) for i, t in enumerate(ts)]
    inplace = torch.full((7,), float(r))
    h_inplace = hvd.allreduce_async_(inplace, op=hvd.Max)
    polls = 0
    while not all(hvd.poll(h) for h in handles) and polls < 100000:
        polls += 1
    outs = [hvd.synchronize(h) for h in handles]
    same = hvd.synchronize(h_inplace)
    total = float(sum(range(1, W + 1)))
    ops = {
        name: float(hvd.allreduce(torch.tensor([float(r + 2)]), op=op)[0])
        for name, op in [
            ("avg", hvd.Average),
            ("sum", hvd.Sum),
            ("min", hvd.Min),
            ("max", hvd.Max),
            ("prod", hvd.Product),
        ]
    }
    scaled = hvd.allreduce(torch.ones(3), op=hvd.Sum, prescale_factor=2.0, postscale_factor=0.5)
    ints = hvd.allreduce(torch.tensor([r + 1, 7], dtype=torch.int8), op=hvd.Sum)
    return {
        "ok": all(bool((o == total).all()) for o in outs),
        "inplace_is_same": same is inplace,
        "inplace": inplace.tolist(),
        "ops": ops,
        "scaled": scaled.tolist(),
        "ints": ints.tolist(),
        "int_dtype": str(ints.dtype),
        "unchanged": bool((ts[0] == r + 1).all()),
    }


def grouped(**_):
    W, r = hvd.size(), hvd.rank()
    a, b, c = torch.full((3,), float(r)), torch.full((2, 2), float(2 * r)), torch.tensor([r, 1], dtype=torch.int64)
    ra, rb, rc = hvd.grouped_allreduce([a, b, c], op=hvd.Sum)
    ga, gb = hvd.grouped_allgather([torch.full((r + 1,), float(r)), torch.full((1, 2), float(r))])
    rs = hvd.grouped_reducescatter([torch.arange(W * 2, dtype=torch.float32) + r], op=hvd.Sum)
    inplace = [torch.ones(2) * r, torch.ones(3) * r]
    hvd.grouped_allreduce_(inplace, op=hvd.Average)
    return {
        "a": ra.tolist(),
        "b": rb.tolist(),
        "c": rc.tolist(),
        "c_dtype": str(rc.dtype),
        "ga": ga.tolist(),
        "gb": gb.tolist(),
        "rs": rs[0].tolist(),
        "inplace": [t.tolist() for t in inplace],
    }


def process_sets(**_):
    W, r = hvd.size(), hvd.rank()
    evens = hvd.add_process_set(list(range(0, W, 2)))
    odds = hvd.add_process_set(hvd.ProcessSet(list(range(1, W, 2))))
    out = {
        "evens_size": evens.size(),
        "odds_size": odds.size(),
        "in_evens": evens.included(),
        "rank_in_set": (evens if evens.included() else odds).rank(),
    }
    mine = evens if evens.included() else odds
    out["sum"] = float(hvd.allreduce(torch.tensor([float(r)]), op=hvd.Sum, process_set=mine)[0])
    out["gather"] = hvd.allgather(torch.tensor([r]), process_set=mine).tolist()
    out["bcast"] = int(hvd.broadcast(torch.tensor([r * 10]), root_rank=mine.ranks[-1], process_set=mine)[0])
    hvd.barrier(process_set=mine)
    hvd.barrier()
    try:
        hvd.allreduce(torch.ones(1), process_set=odds if mine is evens else evens)
        out["outsider"] = "no error"
    except hvd.HorovodError as exc:
        out["outsider"] = type(exc).__name__
    out["removed"] = hvd.remove_process_set(odds) and hvd.remove_process_set(evens)
    return out


def allgather(**_):
    _W, r = hvd.size(), hvd.rank()
    t = torch.full((r + 1, 2), r, dtype=torch.int8)
    g = hvd.allgather(t)
    objs = hvd.allgather_object({"rank": r, "tuple": (r, "x"), "t": torch.tensor([r])})
    return {
        "shape": list(g.shape),
        "dtype": str(g.dtype),
        "rows": g[:, 0].tolist(),
        "objs": [[o["rank"], list(o["tuple"]), o["t"].tolist(), isinstance(o["tuple"], tuple)] for o in objs],
    }


def alltoall(**_):
    W, r = hvd.size(), hvd.rank()
    splits = [d + 1 for d in range(W)]  # rank r sends d+1 rows to rank d
    rows = torch.cat([torch.full((d + 1, 3), float(100 * r + d)) for d in range(W)])
    out, received = hvd.alltoall(rows, splits=splits)
    even = hvd.alltoall(torch.arange(W * 2, dtype=torch.float32) + 10 * r)
    return {"received": received.tolist(), "firstcol": out[:, 0].tolist(), "even": even.tolist()}


def objects(**_):
    r = hvd.rank()
    obj = {"lr": 0.1, "betas": (0.9, 0.99), 3: [None, True, float("inf")], "t": torch.arange(3.0), "who": r}
    got = hvd.broadcast_object(obj if r == 0 else None, root_rank=0)
    try:
        from disttrain.horovod.functions import encode_object

        encode_object({"bad": object()})
        refused = "no error"
    except hvd.HorovodError as exc:
        refused = str(exc).splitlines()[0]
    sets = hvd.allgather_object({r, "x", (r, 1)})
    return {
        "sets": [sorted(map(str, x)) for x in sets],
        "set_types": sorted({type(x).__name__ for x in sets}),
        "who": got["who"],
        "betas_tuple": isinstance(got["betas"], tuple),
        "int_key": 3 in got,
        "inf": got[3][2] == float("inf"),
        "t": got["t"].tolist(),
        "refused": refused,
    }


def syncbn(per_rank: int = 4, **_):
    W, r = hvd.size(), hvd.rank()
    g = torch.Generator().manual_seed(77)
    x = torch.randn(W * per_rank, 3, 5, generator=g) * 3 + 1
    w_up = torch.randn(W * per_rank, 3, 5, generator=g)
    torch.manual_seed(0)
    sbn, bn = hvd.SyncBatchNorm(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        for m in (sbn, bn):
            m.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
            m.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    lo, hi = r * per_rank, (r + 1) * per_rank
    mine = x[lo:hi].clone().requires_grad_(True)
    out = sbn(mine)
    (out * w_up[lo:hi]).sum().backward()
    full = x.clone().requires_grad_(True)
    ref = bn(full)
    (ref * w_up).sum().backward()
    wgrad = hvd.allreduce(sbn.weight.grad, op=hvd.Sum)
    return {
        "out": float((out - ref[lo:hi]).abs().max()),
        "xgrad": float((mine.grad - full.grad[lo:hi]).abs().max()),
        "wgrad": float((wgrad - bn.weight.grad).abs().max()),
        "running": float(
            (sbn.running_var - bn.running_var).abs().max() + (sbn.running_mean - bn.running_mean).abs().max()
        ),
    }


def join(**_):
    """Uneven data: rank r has r+1 batches; ranks out of data join and contribute zeros."""
    W, r = hvd.size(), hvd.rank()
    model, ref = _model(9), _model(9)
    opt = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=model.named_parameters()
    )
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in range(r + 1):
        x, y = _data(30 + step, 4, seed=r)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    last = hvd.join()
    hvd.broadcast_parameters(model.state_dict(), root_rank=last)  # Horovod's pattern after join
    for step in range(W):  # reference: the active ranks' gradients summed, divided by W
        ref_opt.zero_grad()
        for src in range(step, W):
            x, y = _data(30 + step, 4, seed=src)
            (torch.nn.functional.mse_loss(ref(x), y) / W).backward()
        ref_opt.step()
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = hvd.allgather(params.unsqueeze(0))
    return {"last": last, "vs_single": _maxdiff(model, ref), "ranks_equal": float((gathered - gathered[0]).abs().max())}


def join_refuses_broadcast(**_):
    """Horovod 0.28: while a rank has joined, broadcast and allgather raise on the ranks that
    submit them; the joined rank's join() still returns once they join too."""
    r = hvd.rank()
    errors = []
    if r == 0:
        last = hvd.join()
    else:
        for call in (lambda: hvd.broadcast(torch.ones(2), root_rank=1), lambda: hvd.allgather(torch.ones(2))):
            try:
                call()
                errors.append("no error")
            except hvd.HorovodInternalError as exc:
                errors.append(str(exc))
        last = hvd.join()
    return {"errors": errors, "last": last, "after": float(hvd.allreduce(torch.ones(1), op=hvd.Sum)[0])}


def mismatch(**_):
    r = hvd.rank()
    out = {}
    for kind, t in [
        ("shape", torch.ones(r + 2)),
        ("dtype", torch.ones(3, dtype=torch.float64 if r else torch.float32)),
    ]:
        try:
            hvd.allreduce(t, name=f"bad_{kind}")
            out[kind] = "no error"
        except hvd.HorovodInternalError as exc:
            out[kind] = str(exc)
    h = hvd.allreduce_async(torch.ones(r + 1))  # raised by synchronize, not by the call
    try:
        hvd.synchronize(h)
        out["async"] = "no error"
    except hvd.HorovodInternalError:
        out["async"] = "raised at synchronize"
    out["after"] = float(hvd.allreduce(torch.ones(1), op=hvd.Sum)[0])
    return out


def reducescatter(**_):
    W, r = hvd.size(), hvd.rank()
    t = torch.arange(W * 2 + 1, dtype=torch.float32).unsqueeze(1).repeat(1, 2) * (r + 1)
    out = hvd.reducescatter(t, op=hvd.Sum)
    avg = hvd.reducescatter(torch.ones(W, 1) * r)
    return {"rows": out[:, 0].tolist(), "avg": avg[:, 0].tolist()}


def grads(**_):
    """Gradients through the grouped ops and reducescatter, by Horovod's rules (its autograd functions)."""
    W, r = hvd.size(), hvd.rank()
    xs = [torch.full((3,), float(r), requires_grad=True), torch.ones(2, requires_grad=True)]
    ys = hvd.grouped_allreduce(xs, op=hvd.Sum)
    (ys[0].sum() * 2 + ys[1].sum()).backward()  # allreduced with the same op: W * 2 and W * 1
    a = torch.full((r + 1, 2), float(r), requires_grad=True)
    (ga,) = hvd.grouped_allgather([a])
    (ga * 3).sum().backward()  # averaged over ranks, this rank's rows: 3
    t = torch.ones(W * 2, 2, requires_grad=True)
    hvd.reducescatter(t, op=hvd.Sum).sum().backward()  # allgathered, times W for Sum
    u = torch.ones(W * 2, 2, requires_grad=True)
    hvd.reducescatter(u).sum().backward()  # Average: allgathered
    v = torch.ones(W * 2, requires_grad=True)
    (o,) = hvd.grouped_reducescatter([v], op=hvd.Sum, postscale_factor=0.5)
    o.sum().backward()  # W * 0.5
    return {
        "grouped_allreduce": [x.grad.tolist() for x in xs],
        "grouped_allgather": a.grad.tolist(),
        "reducescatter_sum": t.grad.unique().tolist(),
        "reducescatter_avg": u.grad.unique().tolist(),
        "grouped_reducescatter": v.grad.unique().tolist(),
        "values": [y.tolist() for y in ys],
    }


def adasum(**_):
    W, r = hvd.size(), hvd.rank()
    g = torch.Generator().manual_seed(5)
    vecs = [torch.randn(6, generator=g, dtype=torch.float64) for _ in range(W)]
    try:
        out = hvd.allreduce(vecs[r].clone(), op=hvd.Adasum)
    except NotImplementedError as exc:
        return {"error": str(exc)}
    vals = vecs
    while len(vals) > 1:
        nxt = []
        for a, b in zip(vals[::2], vals[1::2]):
            d = torch.dot(a, b)
            nxt.append((1 - d / (2 * torch.dot(a, a))) * a + (1 - d / (2 * torch.dot(b, b))) * b)
        vals = nxt
    return {"err": float((out - vals[0]).abs().max())}


def timeline(path: str = "", **_):
    hvd.start_timeline(path)
    hvd.allreduce(torch.ones(10), name="grad.w")
    hvd.synchronize(hvd.allgather_async(torch.ones(2, 2), name="gather.me"))
    hvd.stop_timeline()
    if hvd.rank() != 0:
        return {"exists_here": os.path.exists(path)}
    with open(path) as f:
        doc = json.load(f)
    ev = doc["traceEvents"]
    return {
        "names": sorted({e["name"] for e in ev if e["ph"] == "X"}),
        "rows": sorted(e["args"]["name"] for e in ev if e["ph"] == "M" and e["name"] == "process_name"),
        "fields_ok": all({"ph", "pid", "name"} <= set(e) for e in ev)
        and all("ts" in e and "dur" in e for e in ev if e["ph"] == "X"),
    }


PATTERNS = {
    f.__name__: f
    for f in [
        basics,
        training,
        bpps,
        fp16,
        async_ops,
        grouped,
        process_sets,
        allgather,
        alltoall,
        objects,
        syncbn,
        join,
        join_refuses_broadcast,
        mismatch,
        reducescatter,
        grads,
        adasum,
        timeline,
        *NAMED,
    ]
}


def patterns(names: list[str], args: dict | None = None) -> dict:
    hvd.init()
    out = {"_backend": hvd.basics.context().backend}
    try:
        for name in names:
            try:
                out[name] = {"ok": True, "value": PATTERNS[name](**(args or {}).get(name, {}))}
            except Exception:
                out[name] = {"ok": False, "error": traceback.format_exc()}
    finally:
        hvd.shutdown()
    return out


def backend_ops() -> dict:
    """The ``horovod`` collectives backend (an installed Horovod) through our communicator."""
    import collectives
    from launcher.torch_store import AuthStore

    comm = collectives.init("horovod", store=AuthStore.from_env(60), timeout=60)
    r, W = comm.rank, comm.world_size
    try:
        t = torch.full((5,), float(r + 1))
        comm.allreduce(t)
        outs = [torch.empty(k + 1) for k in range(W)]
        comm.allgather(outs, torch.full((r + 1,), float(r)))
        b = torch.full((3,), float(r))
        comm.broadcast(b, src=W - 1)
        rs = torch.empty(2)
        comm.reduce_scatter(rs, [torch.full((2,), float(k + r)) for k in range(W)])
        a2a_out = [torch.empty(r + 1) for _ in range(W)]
        comm.all_to_all(a2a_out, [torch.full((k + 1,), float(10 * r + k)) for k in range(W)])
        comm.barrier()
        sub = comm.new_group([0, W - 1])
        sub_sum = None
        if sub is not None:
            s = torch.ones(2)
            sub.allreduce(s)
            sub_sum = s.tolist()
        return {
            "allreduce": t.tolist(),
            "allgather": [o.tolist() for o in outs],
            "broadcast": b.tolist(),
            "reduce_scatter": rs.tolist(),
            "all_to_all": [o.tolist() for o in a2a_out],
            "sub": sub_sum,
        }
    finally:
        comm.close()
