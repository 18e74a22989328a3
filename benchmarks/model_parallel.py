"""Model parallel on 4 ranks: tokens/s per dp x tp x pp layout, the pipeline bubble, and torch's TP as the peer.

    python benchmarks/model_parallel.py --quick --json /tmp/mp.json
    python benchmarks/model_parallel.py --json results/model_parallel-<host>-<date>.json

Three measurements, each on 4 local ranks (gloo over loopback, 1 thread per rank):

1. Throughput of the GPT example (Shakespeare batches) on every layout through our
   strategy (forward, backward, gradient reduction, clipping, AdamW), median step time.
2. The pipeline bubble of GPipe and 1F1B on pp=4 with m micro-batches, against
   (p-1)/(m+p-1). Four ranks share two cores here, so wall-clock compute time says more about
   the OS scheduler than about the schedule. The bubble is therefore measured with
   *fixed-cost compute*: each stage's forward sleeps t_f and its backward t_b (sleeping
   uses no core, so all four stages really run concurrently), on top of the real (tiny)
   stage compute and the real send/recv of activations, over the shm backend (``--bubble-backend
   torch`` for gloo, whose millisecond per hop adds about 3% to p=2's interleaved bubble: 1.14 vs
   1.06 of the formula, measured). Per stage, bubble = 1 - busy/step
   where busy is the time spent inside forward/backward and step is the whole step
   (barrier to barrier, loss broadcast included); reported as the mean over stages, median
   over steps. The same accounting with real compute only is reported too, as
   ``bubble_real_compute`` (distorted by core sharing).
3. The transformers Llama (``LlamaForCausalLM`` from a config) at dp2 x tp2 through our
   strategy with the model's own plan, next to torch's ``parallelize_module`` applying the
   same plan (transformers' ``_tp_plan`` translated to Colwise/RowwiseParallel; the head
   gathers its logits as that plan says, ours keeps them split and uses the vocab-parallel
   loss), interleaved in the same run: ``ratios.hf_llama_tp_vs_torch_tp`` (tokens/s).
4. The interleaved 1F1B bubble (v=2) at p=2 (dp2 x pp2) and p=4, fixed-cost compute (each
   chunk sleeps t/v), against (p-1)/(v*m+p-1): ``ratios.bubble_interleaved_vs_formula``.
5. The peer on the GPT: torch's ``parallelize_module`` (ColwiseParallel / RowwiseParallel on the same
   qkv/proj/fc/proj, with the qkv rows permuted so each rank gets whole heads of q, k and
   v) on the tp layouts (1x4x1, and 2x2x1 with a manual gradient allreduce over dp),
   interleaved with ours in the same run. The peer keeps the embeddings and the head
   replicated (ours splits them over the vocabulary).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUTS = ["2x2x1", "2x1x2", "1x2x2", "4x1x1", "1x1x4", "1x4x1"]
PEER_LAYOUTS = ["2x2x1", "1x4x1"]


def _parallel_cfg(layout: str, schedule: str = "1f1b", microbatches: int = 4, v: int = 1):
    from disttrain.config import ParallelConfig

    dp, tp, pp = (int(v) for v in layout.split("x"))
    return ParallelConfig.model_validate(
        {
            "mesh": {"dp": dp, "tp": tp, "pp": pp},
            "pipeline": {"schedule": schedule, "microbatches": microbatches, "virtual_stages": v},
        }
    )


def _model(size: dict, vocab: int):
    import torch

    from disttrain.examples.gpt import GPT

    torch.manual_seed(0)
    return GPT(vocab, size["n_layer"], size["n_head"], size["d_model"], size["seq_len"])


def _ours(comm, task, size, layout, schedule="1f1b", microbatches=4, v=1):
    import torch

    from disttrain.parallel.model_parallel import build_model_parallel

    model = _model(size, task.num_classes)
    cfg = _parallel_cfg(layout, schedule, microbatches, v)
    return build_model_parallel(cfg, model, lambda ps: torch.optim.AdamW(ps, lr=1e-3), comm, seed=0)


def _step_ours(s, batch, loss_fn):
    if s.pipeline is not None:
        s.forward_backward([batch], loss_fn)
    else:
        loss_fn(s.model(batch[0]), batch[1]).backward()
    s.finish_gradients()
    s.clip_grad_norm(1.0)
    s.optimizer_step()
    s.zero_grad()


def _peer(comm, task, size, layout):
    """torch's tensor parallel on a (dp, tp) DeviceMesh; returns a step function."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    dp, tp, _ = (int(v) for v in layout.split("x"))
    mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
    model = _model(size, task.num_classes)
    d, hd = size["d_model"], size["d_model"] // tp
    with torch.no_grad():  # rows [q_0 k_0 v_0 | q_1 k_1 v_1 | ...]: contiguous chunks hold whole heads
        order = torch.cat([torch.arange(c * d + r * hd, c * d + (r + 1) * hd) for r in range(tp) for c in range(3)])
        for b in model.blocks:
            b.attn.qkv.weight.copy_(b.attn.qkv.weight[order])
            b.attn.qkv.bias.copy_(b.attn.qkv.bias[order])
    plan = {}
    for i in range(len(model.blocks)):
        plan.update(
            {
                f"blocks.{i}.attn.qkv": ColwiseParallel(),
                f"blocks.{i}.attn.proj": RowwiseParallel(),
                f"blocks.{i}.mlp.fc": ColwiseParallel(),
                f"blocks.{i}.mlp.proj": RowwiseParallel(),
            }
        )
    parallelize_module(model, mesh["tp"], plan)
    for b in model.blocks:  # Attention reads its local width from out_features, which torch leaves global
        b.attn.qkv.out_features = 3 * d // tp
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    dp_group = mesh["dp"].get_group() if dp > 1 else None

    def step(batch, loss_fn):
        x, y = batch
        loss_fn(model(x), y).backward()
        if dp_group is not None:  # one flat allreduce over dp, like ours
            grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in model.parameters()]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=dp_group)
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
        # clip_grad_norm_ rejects a mix of DTensor and Tensor grads: sharded squares summed over tp.
        sharded = sum(
            float(p.grad.to_local().double().pow(2).sum()) for p in model.parameters() if hasattr(p.grad, "to_local")
        )
        sq = torch.tensor([sharded], dtype=torch.float64)
        dist.all_reduce(sq, group=mesh["tp"].get_group())
        sq += sum(float(p.grad.double().pow(2).sum()) for p in model.parameters() if not hasattr(p.grad, "to_local"))
        coef = 1.0 / (float(sq.sqrt()) + 1e-6)
        if coef < 1:
            for p in model.parameters():
                p.grad.mul_(coef)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


LLAMA = {
    "quick": dict(hidden=128, layers=2, heads=4, kv=4, inter=256, vocab=2048, seq=64, batch=16),
    "full": dict(hidden=256, layers=4, heads=8, kv=8, inter=512, vocab=4096, seq=128, batch=16),
}


def _llama(size: dict):
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=size["vocab"],
        hidden_size=size["hidden"],
        intermediate_size=size["inter"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        num_key_value_heads=size["kv"],
        max_position_embeddings=size["seq"],
        bos_token_id=0,
        eos_token_id=1,
    )
    return transformers.LlamaForCausalLM(cfg)


def _llama_loss(out, y):
    from disttrain.parallel.tensor.vocab import cross_entropy

    logits = out.logits if hasattr(out, "logits") else out
    return cross_entropy(logits, y, reduction="sum") / y.numel()


def _llama_ours(comm, size):
    import torch

    from disttrain.parallel.model_parallel import build_model_parallel

    make = lambda ps: torch.optim.AdamW(ps, lr=1e-3)  # noqa: E731
    return build_model_parallel(_parallel_cfg("2x2x1"), _llama(size), make, comm, seed=0)


def _llama_peer(comm, size):
    """torch's parallelize_module with the model's own transformers plan, dp2 x tp2; a step function."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = _llama(size)
    styles = {
        "colwise": lambda: ColwiseParallel(),
        "rowwise": lambda: RowwiseParallel(),
        "colwise_gather_output": lambda: ColwiseParallel(output_layouts=Replicate()),
        "embedding_rowwise": lambda: RowwiseParallel(input_layouts=Replicate()),
    }
    names = [n for n, _ in model.named_modules()]
    import fnmatch

    plan = {}
    for glob, style in model._tp_plan.items():
        for n in names:
            if fnmatch.fnmatchcase(n, glob):
                plan[n] = styles[style]()
    parallelize_module(model, mesh["tp"], plan)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    dp_group = mesh["dp"].get_group()
    tp_group = mesh["tp"].get_group()

    def step(batch, loss_fn):
        x, y = batch
        loss_fn(model(x), y).backward()
        grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in model.parameters()]
        flat = torch.cat([g.reshape(-1) for g in grads])  # one flat allreduce over dp, like ours
        dist.all_reduce(flat, group=dp_group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
        sq = torch.tensor(
            [
                sum(
                    float(g.double().pow(2).sum())
                    for p, g in zip(model.parameters(), grads)
                    if hasattr(p.grad, "to_local")
                )
            ],
            dtype=torch.float64,
        )
        dist.all_reduce(sq, group=tp_group)
        sq += sum(
            float(g.double().pow(2).sum()) for p, g in zip(model.parameters(), grads) if not hasattr(p.grad, "to_local")
        )
        coef = 1.0 / (float(sq.sqrt()) + 1e-6)
        if coef < 1:
            for g in grads:
                g.mul_(coef)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


class _Delay:
    """Fixed-cost compute: sleep ``fwd`` seconds in forward and ``bwd`` in backward."""

    def __init__(self, fwd: float, bwd: float):
        import torch

        class Fn(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                time.sleep(fwd)
                return x.view_as(x)

            @staticmethod
            def backward(ctx, g):
                time.sleep(bwd)
                return g

        self.fn = Fn

    def wrap(self, chunk):
        """Make ``chunk(x)`` cost the fixed time (on top of its real compute)."""
        real = chunk.forward

        def delayed(x):
            return self.fn.apply(real(x))

        chunk.forward = delayed


def bench_rank(quick: bool, bubble_backend: str = "shm") -> dict:
    """Every rank: all measurements in turn; rank 0's result carries the aggregates."""
    import torch

    import collectives
    from collectives import ReduceOp
    from disttrain.examples.shakespeare import load_shakespeare

    torch.set_num_threads(1)
    comm = collectives.init("torch", timeout=300)
    size = (
        {"n_layer": 4, "n_head": 4, "d_model": 64, "seq_len": 32, "batch": 16}
        if quick
        else {"n_layer": 8, "n_head": 8, "d_model": 128, "seq_len": 64, "batch": 32}
    )
    steps, rounds = (3, 2) if quick else (6, 3)
    task = load_shakespeare(["macbeth_gut"], 0.1, size["seq_len"])
    g = torch.Generator().manual_seed(0)
    batch = task.batch(torch.randint(0, task.num_train, (size["batch"],), generator=g))
    count = batch[1].numel()
    loss_fn = lambda logits, y: task.loss_sum(logits, y) / count  # noqa: E731

    def local(layout, s):  # this replica's share of the global batch
        dp = int(layout.split("x")[0])
        r = s.dp_rank if s is not None else comm.rank // (comm.world_size // dp) % dp
        n = size["batch"]
        return batch[0][r * n // dp : (r + 1) * n // dp], batch[1][r * n // dp : (r + 1) * n // dp]

    def timed(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(steps):
            comm.barrier()
            t0 = time.perf_counter()
            fn()
            dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            comm.allreduce(dt, ReduceOp.MAX)
            times.append(float(dt))
        return statistics.median(times)

    tokens = size["batch"] * size["seq_len"]
    ours = {k: float("inf") for k in LAYOUTS}
    peer = {k: float("inf") for k in PEER_LAYOUTS}
    built = {k: _ours(comm, task, size, k) for k in LAYOUTS}
    peers = {}
    for k in PEER_LAYOUTS:
        try:
            peers[k] = _peer(comm, task, size, k)
        except Exception as exc:  # noqa: BLE001 - the peer is optional; report why it did not run
            peers[k] = exc
    for _ in range(rounds):  # interleaved, best of rounds
        for k in LAYOUTS:
            s = built[k]
            ours[k] = min(ours[k], timed(lambda s=s, k=k: _step_ours(s, local(k, s), loss_fn)))
            if k in peers and callable(peers[k]):
                p = peers[k]
                peer[k] = min(peer[k], timed(lambda p=p, k=k: p(local(k, None), loss_fn)))

    # -- transformers Llama at dp2 x tp2: ours vs torch's parallelize_module with its own plan ---------
    lsize = LLAMA["quick" if quick else "full"]
    lg = torch.Generator().manual_seed(1)
    ids = torch.randint(0, lsize["vocab"], (lsize["batch"], lsize["seq"] + 1), generator=lg)
    lbatch = (ids[:, :-1].contiguous(), ids[:, 1:].contiguous())
    llama_ours, llama_peer = _llama_ours(comm, lsize), None
    try:
        llama_peer = _llama_peer(comm, lsize)
    except Exception as exc:  # noqa: BLE001 - reported, not hidden
        llama_peer = exc
    hf = {"ours": float("inf"), "torch_tp": float("inf")}

    def llocal(s):  # dp2 x tp2: this replica's half of the batch
        r = s.dp_rank if s is not None else comm.rank // 2
        n = lsize["batch"] // 2
        return lbatch[0][r * n : (r + 1) * n], lbatch[1][r * n : (r + 1) * n]

    for _ in range(rounds):
        hf["ours"] = min(hf["ours"], timed(lambda: _step_ours(llama_ours, llocal(llama_ours), _llama_loss)))
        if callable(llama_peer):
            hf["torch_tp"] = min(hf["torch_tp"], timed(lambda: llama_peer(llocal(None), _llama_loss)))
    hf_tokens = lsize["batch"] * lsize["seq"]

    # -- the bubble -------------------------------------------------------------------------
    first = comm  # the torch communicator, for the throughput rows; the bubbles' send/recv may use another
    comm = collectives.init(bubble_backend, timeout=300) if bubble_backend != "torch" else comm
    p, m = 4, (4 if quick else 8)
    tf, tb = (0.03, 0.06) if quick else (0.05, 0.1)
    bsize = {"n_layer": 6, "n_head": 2, "d_model": 32, "seq_len": size["seq_len"], "batch": size["batch"]}

    def measure(s, layout) -> float:
        fracs = []
        for i in range(steps + 1):
            comm.barrier()
            t0 = time.perf_counter()
            s.forward_backward([local(layout, s)], loss_fn)
            total = time.perf_counter() - t0
            frac = torch.tensor([1.0 - s.pipeline.timing["busy_s"] / total], dtype=torch.float64)
            comm.allreduce(frac, ReduceOp.SUM)
            s.zero_grad()
            if i:
                fracs.append(float(frac) / comm.world_size)
        return statistics.median(fracs)

    bubble, bubble_real, inter = {}, {}, {}
    for schedule in ("gpipe", "1f1b"):
        s = _ours(comm, task, size, "1x1x4", schedule, m)
        bubble_real[schedule] = measure(s, "1x1x4")
        for chunk in s.pipeline.chunks:
            _Delay(tf, tb).wrap(chunk)
        bubble[schedule] = measure(s, "1x1x4")
    for pp, layout in ((2, "2x1x2"), (4, "1x1x4")):
        v = 2
        s = _ours(comm, task, bsize, layout, "interleaved", m, v)
        for chunk in s.pipeline.chunks:  # a chunk is 1/v of a stage: the same work per rank
            _Delay(tf / v, tb / v).wrap(chunk)
        got = measure(s, layout)
        inter[f"p{pp}"] = {"v": v, "m": m, "bubble": got, "formula": (pp - 1) / (v * m + pp - 1)}
    formula = (p - 1) / (m + p - 1)
    inter_ratios = {k: x["bubble"] / x["formula"] for k, x in inter.items()}
    comm.barrier()
    comm.close()
    if first is not comm:
        first.close()
    if comm.rank != 0:
        return {}
    return {
        "hardware": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, CPU, gloo loopback",
        "bubble_backend": bubble_backend,
        "date": datetime.date.today().isoformat(),
        "quick": quick,
        "model": size,
        "world_size": 4,
        "layouts": {k: {"step_s": ours[k], "tokens_per_s": tokens / ours[k]} for k in LAYOUTS},
        "peer_torch_tp": {
            k: (
                {"step_s": peer[k], "tokens_per_s": tokens / peer[k]}
                if callable(peers[k])
                else {"error": str(peers[k])[:300]}
            )
            for k in PEER_LAYOUTS
        },
        "bubble": {
            "stages": p,
            "microbatches": m,
            "t_forward_s": tf,
            "t_backward_s": tb,
            "formula": formula,
            "gpipe": bubble["gpipe"],
            "1f1b": bubble["1f1b"],
            "real_compute": bubble_real,
        },
        "hf_llama": {
            "model": lsize,
            "layout": "2x2x1",
            "ours": {"step_s": hf["ours"], "tokens_per_s": hf_tokens / hf["ours"]},
            "torch_tp": (
                {"step_s": hf["torch_tp"], "tokens_per_s": hf_tokens / hf["torch_tp"]}
                if callable(llama_peer)
                else {"error": str(llama_peer)[:300]}
            ),
        },
        "bubble_interleaved": inter,
        "ratios": {
            "hf_llama_tp_vs_torch_tp": hf["torch_tp"] / hf["ours"] if callable(llama_peer) else float("nan"),
            "bubble_interleaved_vs_formula": max(inter_ratios.values(), key=lambda r: abs(r - 1.0)),
            **{f"bubble_interleaved_{k}_vs_formula": r for k, r in inter_ratios.items()},
            "bubble_1f1b_vs_formula": bubble["1f1b"] / formula,
            "bubble_gpipe_vs_formula": bubble["gpipe"] / formula,
            **{f"tokens_per_s_ours_vs_torch_tp_{k}": peer[k] / ours[k] for k in PEER_LAYOUTS if callable(peers[k])},
        },
    }


def bubble_rank(tf: float, tb: float, m: int, steps: int = 3, backend: str = "shm") -> dict:
    """Every rank: only the bubbles (1F1B and interleaved at p=2 and 4), fixed-cost compute ``tf``/``tb``
    per whole stage (a chunk of v sleeps 1/v of it). For a quiet rerun with longer fixed costs."""
    import torch

    import collectives
    from collectives import ReduceOp
    from disttrain.examples.shakespeare import load_shakespeare

    torch.set_num_threads(1)
    comm = collectives.init(backend, timeout=300)
    size = {"n_layer": 6, "n_head": 2, "d_model": 32, "seq_len": 16, "batch": 16}
    task = load_shakespeare(["macbeth_gut"], 0.1, size["seq_len"])
    batch = task.batch(torch.arange(size["batch"]))
    loss_fn = lambda logits, y: task.loss_sum(logits, y) / y.numel()  # noqa: E731
    out = {}
    for name, layout, schedule, v in (
        ("1f1b_p4", "1x1x4", "1f1b", 1),
        ("interleaved_p2", "2x1x2", "interleaved", 2),
        ("interleaved_p4", "1x1x4", "interleaved", 2),
    ):
        s = _ours(comm, task, size, layout, schedule, m, v)
        for chunk in s.pipeline.chunks:
            _Delay(tf / v, tb / v).wrap(chunk)
        dp = int(layout.split("x")[0])
        mine = tuple(t[s.dp_rank * size["batch"] // dp : (s.dp_rank + 1) * size["batch"] // dp] for t in batch)
        fracs = []
        for i in range(steps + 1):
            comm.barrier()
            t0 = time.perf_counter()
            s.forward_backward([mine], loss_fn)
            frac = torch.tensor([1.0 - s.pipeline.timing["busy_s"] / (time.perf_counter() - t0)], dtype=torch.float64)
            comm.allreduce(frac, ReduceOp.SUM)
            s.zero_grad()
            if i:
                fracs.append(float(frac) / comm.world_size)
        p = int(layout.split("x")[2])
        formula = (p - 1) / (v * m + p - 1)
        out[name] = {"p": p, "v": v, "m": m, "bubble": statistics.median(fracs), "formula": formula}
    comm.barrier()
    comm.close()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small model, few steps (about a minute)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--bubble-only", type=float, metavar="T_FORWARD", help="only the bubbles, with t_f (t_b = 2 t_f)")
    ap.add_argument("--bubble-backend", default="shm", help="the pipeline's send/recv in the bubbles (default shm)")
    args = ap.parse_args(argv)
    sys.path.insert(0, ROOT)
    from tests.support.harness import spawn

    if args.bubble_only:
        tf = args.bubble_only
        res = spawn(
            "benchmarks.model_parallel:bubble_rank",
            4,
            args={"tf": tf, "tb": 2 * tf, "m": 4, "backend": args.bubble_backend},
            timeout=1200,
        )[0]
        for k, x in res.items():
            print(
                f"{k}: v={x['v']} m={x['m']} bubble {x['bubble']:.3f} | formula {x['formula']:.3f} | "
                f"ratio {x['bubble'] / x['formula']:.3f}"
            )
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"t_forward_s": tf, "bubbles": res}, f, indent=2)
        return 0

    res = spawn(
        "benchmarks.model_parallel:bench_rank",
        4,
        args={"quick": args.quick, "bubble_backend": args.bubble_backend},
        timeout=1200,
    )[0]
    print(f"model parallel on 4 ranks ({res['hardware']}, {res['date']}), GPT {res['model']}")
    print(f"{'layout dp x tp x pp':<22}{'ours tok/s':>12}{'torch TP tok/s':>16}")
    for k, v in res["layouts"].items():
        pv = res["peer_torch_tp"].get(k, {})
        ps = f"{pv['tokens_per_s']:>16,.0f}" if "tokens_per_s" in pv else f"{'error' if pv else '-':>16}"
        print(f"{k:<22}{v['tokens_per_s']:>12,.0f}{ps}")
    b = res["bubble"]
    print(
        f"\nbubble, p={b['stages']} m={b['microbatches']} (fixed-cost compute t_f={b['t_forward_s']}s "
        f"t_b={b['t_backward_s']}s): formula {b['formula']:.3f} | gpipe {b['gpipe']:.3f} | 1f1b {b['1f1b']:.3f} | "
        f"real compute: gpipe {b['real_compute']['gpipe']:.3f}, 1f1b {b['real_compute']['1f1b']:.3f}"
    )
    h = res["hf_llama"]
    peer_s = f"{h['torch_tp']['tokens_per_s']:,.0f}" if "tokens_per_s" in h["torch_tp"] else "error"
    print(
        f"transformers Llama {h['model']} at {h['layout']}: ours {h['ours']['tokens_per_s']:,.0f} tok/s | "
        f"torch parallelize_module (its own plan) {peer_s} tok/s"
    )
    for k, x in res["bubble_interleaved"].items():
        print(f"interleaved 1F1B {k} v={x['v']} m={x['m']}: bubble {x['bubble']:.3f} | formula {x['formula']:.3f}")
    for k, v in res["ratios"].items():
        print(f"  {k}: {v:.3f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
