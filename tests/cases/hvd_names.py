"""Rank functions for Horovod's name-matching behaviours (run by ``hvd_api.patterns`` in the
same job as the API patterns): ops in different orders per rank, rank-dependent losses, many
threads, a name missing on one rank, errors that leave the next op working, sparse allreduce,
process sets added/removed/re-added, and the environment a Horovod launcher sets."""

from __future__ import annotations

import os
import threading
import time

import torch

import disttrain.horovod as hvd


def orders(**_):
    """Rank r submits names in its own rotation; every op completes with the right sum."""
    W, r = hvd.size(), hvd.rank()
    names = [f"ord{i}" for i in range(6)]
    mine = names[r:] + names[:r]
    if r % 2:
        mine.reverse()
    hs = {n: hvd.allreduce_async(torch.full((3 + names.index(n),), float(r + 1)), name=n, op=hvd.Sum) for n in mine}
    got = {n: hvd.synchronize(h).tolist() for n, h in hs.items()}
    # in-place ops of mixed kinds, also out of order
    if r == 0:
        hb = hvd.broadcast_async(torch.full((2,), float(r)), root_rank=W - 1, name="ord.b")
        hg = hvd.allgather_async(torch.full((1,), r), name="ord.g")
    else:
        hg = hvd.allgather_async(torch.full((1,), r), name="ord.g")
        hb = hvd.broadcast_async(torch.full((2,), float(r)), root_rank=W - 1, name="ord.b")
    return {
        "sums": [got[n] for n in names],
        "bcast": hvd.synchronize(hb).tolist(),
        "gather": hvd.synchronize(hg).tolist(),
    }


class _Branchy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(5, 6)
        self.fc2 = torch.nn.Linear(6, 2)
        self.fc3 = torch.nn.Linear(6, 2)

    def forward(self, x, branch: int):
        h = torch.tanh(self.fc1(x))
        return self.fc2(h) if branch == 0 else self.fc3(h)


def rank_dependent(steps: int = 3, **_):
    """Horovod's rank-dependent loss: rank 0 backpropagates through fc2, the others through fc3
    (gradient hooks fire in different orders, and for different parameters). Reference: one
    process summing every rank's loss divided by the world size."""
    W, r = hvd.size(), hvd.rank()
    torch.manual_seed(11)
    model = _Branchy()
    ref = _Branchy()
    ref.load_state_dict(model.state_dict())
    opt = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.2), named_parameters=model.named_parameters()
    )
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.2)
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        xs = [torch.randn(4, 5, generator=g) for _ in range(W)]
        opt.zero_grad()
        model(xs[r], 0 if r == 0 else 1).pow(2).mean().backward()
        opt.step()
        ref_opt.zero_grad()
        for k in range(W):
            (ref(xs[k], 0 if k == 0 else 1).pow(2).mean() / W).backward()
        ref_opt.step()
    diff = max(float((p - q).detach().abs().max()) for p, q in zip(model.parameters(), ref.parameters()))
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = hvd.allgather(flat.unsqueeze(0), name="rank_dependent.check")
    return {"vs_single": diff, "ranks_equal": float((gathered - gathered[0]).abs().max())}


def threads(n: int = 8, **_):
    """Many threads submit named ops at once, each thread its own name and kind."""
    W, r = hvd.size(), hvd.rank()
    out: dict = {}
    errors: list = []

    def work(k: int) -> None:
        try:
            for rep in range(3):
                s = hvd.allreduce(torch.full((k + 1,), float(k + r)), name=f"th{k}.{rep}", op=hvd.Sum)
                g = hvd.allgather(torch.full((1,), k * 10 + r), name=f"thg{k}.{rep}")
                out[(k, rep)] = (s.tolist(), g.tolist())
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(repr(exc))

    ts = [threading.Thread(target=work, args=(k,)) for k in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    ok = not errors and all(
        out[(k, rep)] == ([float(k * W + sum(range(W)))] * (k + 1), [k * 10 + q for q in range(W)])
        for k in range(n)
        for rep in range(3)
    )
    return {"ok": ok, "errors": errors, "count": len(out)}


def stall(**_):
    """A name only rank 0 submits: after the stall time rank 0's op fails naming the op and
    the ranks that lack it; the other ranks go on, and the next op works everywhere."""
    r = hvd.rank()
    msg = None
    if r == 0:
        try:
            hvd.allreduce(torch.ones(2), name="only_rank0")
            msg = "no error"
        except hvd.HorovodInternalError as exc:
            msg = str(exc)
    else:  # busy elsewhere past the stall time (an op here would wait for rank 0 and stall too)
        time.sleep(float(os.environ["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"]) + 1)
    after = float(hvd.allreduce(torch.ones(1), op=hvd.Sum, name="after_stall")[0])
    return {"msg": msg, "after": after}


def errors(**_):
    """Horovod's error cases: each raises on every rank that submitted it, and the next op works."""
    W, r = hvd.size(), hvd.rank()
    out = {}

    def attempt(key, fn):
        try:
            fn()
            out[key] = "no error"
        except (hvd.HorovodInternalError, ValueError) as exc:
            out[key] = f"{type(exc).__name__}: {exc}"

    attempt("shape", lambda: hvd.allreduce(torch.ones(17 + r, 3), name="e.shape"))
    attempt("dtype", lambda: hvd.allreduce(torch.ones(3, dtype=torch.float64 if r else torch.float32), name="e.dtype"))
    attempt("op", lambda: hvd.allreduce(torch.ones(3), name="e.op", op=hvd.Sum if r else hvd.Max))
    attempt(
        "kind",
        lambda: (
            hvd.allreduce(torch.ones(3), name="e.kind")
            if r == 0
            else hvd.synchronize(hvd.allgather_async(torch.ones(3), name="e.kind"))
        ),
    )
    attempt("gather_dims", lambda: hvd.allgather(torch.ones(2, 3 + r), name="e.gdims"))
    attempt("root", lambda: hvd.broadcast(torch.ones(2), root_rank=r, name="e.root"))
    attempt("splits", lambda: hvd.alltoall(torch.ones(W, 2), splits=[W + 1] + [0] * (W - 1)))
    # a duplicate name in flight: raises at submission on that rank; the first op still completes.
    # As in Horovod's test, the other ranks submit the name only after a barrier, so rank 0's first
    # op is surely still in flight when it submits the duplicate.
    if r == 0:
        first = hvd.allreduce_async(torch.ones(2), name="e.dup", op=hvd.Sum)
        attempt("duplicate", lambda: hvd.allreduce_async(torch.ones(2), name="e.dup"))
    hvd.barrier()
    if r != 0:
        first = hvd.allreduce_async(torch.ones(2), name="e.dup", op=hvd.Sum)
        out["duplicate"] = "not checked"
    out["dup_first"] = hvd.synchronize(first).tolist()
    out["after"] = float(hvd.allreduce(torch.ones(1), op=hvd.Sum)[0])
    return out


def _sparse(seed: int, rows: int, cols: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(rows, cols, generator=g)
    t[t < 0.7] = 0
    return t.to_sparse()


def sparse(**_):
    """sparse_allreduce_async (allgather of indices and values) equals the dense allreduce, and
    DistributedOptimizer over an nn.Embedding(sparse=True) with SparseAdam (both sparse_as_dense
    settings) matches one process on the global batch."""
    W, r = hvd.size(), hvd.rank()
    errs = []
    for i, rows in enumerate([7, 12, 3]):
        t = _sparse(100 * r + i, rows)
        dense = hvd.allreduce(t.to_dense(), name=f"sp.dense{i}")
        got = hvd.sparse_allreduce_async(t, name=f"sp{i}", op=hvd.Average)()
        errs.append(float((got.to_dense() - dense).abs().max()))
    opt_err = {}
    for sad in (False, True):
        torch.manual_seed(3)
        emb, ref = torch.nn.Embedding(10, 3, sparse=True), torch.nn.Embedding(10, 3, sparse=True)
        ref.load_state_dict(emb.state_dict())
        opt = hvd.DistributedOptimizer(
            torch.optim.SparseAdam(list(emb.parameters()), lr=0.1),
            named_parameters=[(f"emb{int(sad)}.weight", emb.weight)],
            sparse_as_dense=sad,
        )
        ref_opt = torch.optim.SparseAdam(list(ref.parameters()), lr=0.1)
        inputs = [torch.tensor([[1, 2, 4, 5], [4, 3, 2, 9]]), torch.tensor([[1, 3, 4, 0], [4, 7, 9, 0]])]
        inputs += [torch.tensor([[k % 10 for k in range(j, j + 4)]] * 2) for j in range(2, W)]
        for _ in range(2):
            opt.zero_grad()
            emb(inputs[r]).sum().backward()
            opt.step()
            ref_opt.zero_grad()
            for k in range(W):
                (ref(inputs[k]).sum() / W).backward()
            ref_opt.step()
        opt_err[str(sad)] = float((emb.weight - ref.weight).abs().max())
    return {"allreduce_err": max(errs), "optimizer_err": opt_err}


def sets_lifecycle(**_):
    """Process sets added, used, removed and re-added (the same ranks) several times; adding a
    duplicate of a registered set raises ValueError on every rank; objects over a set."""
    W, r = hvd.size(), hvd.rank()
    rounds = []
    for k in range(3):
        evens = hvd.add_process_set(list(range(0, W, 2)))
        odds = hvd.add_process_set(list(range(1, W, 2)))
        mine = evens if evens.included() else odds
        s = float(hvd.allreduce(torch.tensor([float(r + k)]), op=hvd.Sum, process_set=mine)[0])
        objs = hvd.allgather_object({"r": r, "k": k}, process_set=mine)
        b = hvd.broadcast_object(
            f"from{mine.ranks[0]}" if r == mine.ranks[0] else None, mine.ranks[0], process_set=mine
        )
        try:
            hvd.add_process_set(list(range(0, W, 2)))
            dup = "no error"
        except ValueError as exc:
            dup = str(exc)
        rounds.append(
            {
                "ids": [evens.process_set_id, odds.process_set_id],
                "sum": s,
                "objs": [o["r"] for o in objs],
                "bcast": b,
                "dup": dup,
                "removed": [hvd.remove_process_set(evens), hvd.remove_process_set(odds)],
                "after_remove": [evens.process_set_id, evens.size()],
            }
        )
    return {"rounds": rounds, "twice": hvd.remove_process_set(hvd.ProcessSet([0]))}


def large(**_):
    """Allreduces past the pool threshold: a held result is never overwritten by the next one,
    in-place results land in the user's tensor, and a fused bucket of many tensors is exact."""
    W, r = hvd.size(), hvd.rank()
    n = 1 << 19  # 2 MiB of float32
    first = hvd.allreduce(torch.full((n,), float(r + 1)), op=hvd.Sum, name="big")
    second = hvd.allreduce(torch.full((n,), float(10 * (r + 1))), op=hvd.Sum, name="big")
    third = hvd.allreduce(torch.full((n,), 1.0), op=hvd.Sum, name="big")
    mine = torch.full((n,), float(r))
    hvd.allreduce_(mine, op=hvd.Max, name="big.inplace")
    parts = [torch.full((1 << 14,), float(r + k)) for k in range(40)]  # 40 x 64 KiB, fused
    hs = [hvd.allreduce_async_(p, op=hvd.Sum, name=f"part{k}") for k, p in enumerate(parts)]
    for h in hs:
        hvd.synchronize(h)
    tot = sum(range(1, W + 1))
    return {
        "held": [float(first.min()), float(first.max())] == [float(tot)] * 2,
        "second": bool((second == 10.0 * tot).all()),
        "third": bool((third == float(W)).all()),
        "inplace": bool((mine == float(W - 1)).all()),
        "parts": all(bool((p == float(sum(q + k for q in range(W)))).all()) for k, p in enumerate(parts)),
    }


def environment(**_):
    """hvd.rank()/size()/local_*() agree with the HOROVOD_* variables when they are set."""
    keys = ["HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_LOCAL_RANK", "HOROVOD_LOCAL_SIZE"]
    return {
        "env": {k: os.environ.get(k) for k in keys},
        "hvd": [hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size()],
    }


NAMED = [orders, rank_dependent, threads, stall, errors, sparse, sets_lifecycle, large, environment]
