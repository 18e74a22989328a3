"""A real-size model on 4 ranks of one host (CPU, fp32): no rank ever holds it whole.

    python benchmarks/big_model.py                 # TinyLlama-shaped Llama, about 1.1B parameters
    python benchmarks/big_model.py --quick         # a 40M-parameter Llama, about a minute
    python benchmarks/big_model.py --world 4 --out results/big_model.json

Each figure is a rank's peak resident memory added while doing one thing (Linux peak RSS, reset
with ``/proc/self/clear_refs`` after imports and a warm-up), over that rank's share of the
model's bytes (model bytes / world); the largest over ranks is reported:

- ``init_peak_vs_shard``: build a transformers Llama with ``model.deferred_init`` and wrap it
  with ZeRO-3 (goal <= 1.5); the peer ``fsdp2_init_peak_vs_shard`` is FSDP2's meta-device recipe
  (meta build, ``fully_shard`` per layer and root, ``to_empty``, initialise each local shard).
- ``pretrained_load_peak_vs_shard``: the same, starting from a saved transformers checkpoint
  (``model.pretrained``: each rank reads its flat ranges); goal <= 1.5 on every rank. The peer
  ``rank0_load_peak_vs_shard`` is the usual rank-0 loading (accelerate, FSDP's
  ``sync_module_states``): rank 0 reads the whole state dict and broadcasts it, each rank keeps its
  shard (rank 0's figure).
- ``lora_zero3_state_vs_formula``: bytes of parameters + gradients + optimizer state of a LoRA
  fine-tune (rank 16 adapters on q/k/v/o, AdamW, frozen base) under ZeRO-3 after one step, over
  frozen/N + trainable x 16/N (fp32 weight, gradient and two Adam moments); goal <= 1.1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import print_table, spawn_job, write_json, write_result  # noqa: E402

FULL = {"hidden": 2048, "inter": 5632, "layers": 22, "heads": 32, "kv": 4, "vocab": 32000}
QUICK = {"hidden": 512, "inter": 1408, "layers": 4, "heads": 8, "kv": 4, "vocab": 32000}


# -- model ----------------------------------------------------------------------------------------
def llama(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int):
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(cfg)


def _lora_linear():
    import torch

    class LoRALinear(torch.nn.Module):
        """A frozen base linear plus a trainable low-rank update, zero at the start."""

        def __init__(self, base, r: int):
            super().__init__()
            self.base = base
            self.lora_a = torch.nn.Linear(base.in_features, r, bias=False)
            self.lora_b = torch.nn.Linear(r, base.out_features, bias=False)
            torch.nn.init.zeros_(self.lora_b.weight)

        def forward(self, x):
            return self.base(x) + self.lora_b(self.lora_a(x))

    return LoRALinear


def llama_lora(r: int = 16, **shape):
    """The Llama, every weight frozen, with LoRA adapters on q/k/v/o."""
    lora = _lora_linear()
    m = llama(**shape)
    for p in m.parameters():
        p.requires_grad_(False)
    for layer in m.model.layers:
        att = layer.self_attn
        att.q_proj, att.k_proj = lora(att.q_proj, r), lora(att.k_proj, r)
        att.v_proj, att.o_proj = lora(att.v_proj, r), lora(att.o_proj, r)
    return m


def model_bytes(shape: dict) -> int:
    h, i, n, kv, v = shape["hidden"], shape["inter"], shape["layers"], shape["kv"], shape["vocab"]
    kvw = h // shape["heads"] * kv
    per_layer = 2 * h * h + 2 * h * kvw + 3 * h * i + 2 * h
    return 4 * (n * per_layer + 2 * v * h + h)


# -- measuring ------------------------------------------------------------------------------------
def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak() -> float:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mb("VmRSS")


def peak_added(base: float) -> float:
    return _status_mb("VmHWM") - base


def _config(shape: dict, strategy: str = "zero3", **model):
    from disttrain.config import ExperimentConfig

    return ExperimentConfig.model_validate(
        {
            "model": {"target": f"benchmarks.big_model:{model.pop('factory', 'llama')}", "kwargs": shape, **model},
            "data": {"target": "benchmarks.big_model:llama"},
            "parallel": {"strategy": strategy},
        }
    )


def _all_ranks(comm, value: float) -> list[float]:
    import torch

    out = [torch.zeros(1, dtype=torch.float64) for _ in range(comm.world_size)]
    comm.allgather(out, torch.tensor([value], dtype=torch.float64))
    return [float(t) for t in out]


# -- rank side ------------------------------------------------------------------------------------
def worker(mode: str, shape: dict, path: str) -> None:
    import torch

    import collectives
    from disttrain.parallel import OptimizerSpec, build_strategy
    from disttrain.session import build_run_model, seed_everything

    torch.set_num_threads(1)
    if mode == "save":  # one process: the checkpoint the load figures start from
        torch.manual_seed(1)
        llama(**shape).save_pretrained(path, max_shard_size="64MB" if shape == QUICK else "1GB")
        write_result({"saved": path})
        return
    comm = collectives.init("torch", timeout=1800)
    llama(hidden=64, inter=64, layers=1, heads=4, kv=4, vocab=64)  # warm-up: imports and first allocations
    spec = OptimizerSpec(build=lambda groups: torch.optim.AdamW(groups, lr=1e-4))
    seed_everything(0)
    result: dict = {}
    base = reset_peak()
    if mode in ("init", "pretrained"):
        cfg = _config(shape, pretrained=path if mode == "pretrained" else None)
        build_strategy(cfg.parallel, build_run_model(cfg, None, []), spec, comm)
    elif mode == "fsdp2":
        import torch.distributed as dist
        from torch.distributed.fsdp import fully_shard

        own = not dist.is_initialized()
        if own:
            dist.init_process_group("gloo")
        with torch.device("meta"):
            m = llama(**shape)
        for layer in m.model.layers:
            fully_shard(layer)
        fully_shard(m)
        m.to_empty(device="cpu")
        with torch.no_grad():
            for p in m.parameters():  # the recipe's init_weights, one local shard at a time
                p.to_local().normal_(0.0, 0.02)
        if own:
            dist.destroy_process_group()
    elif mode == "rank0":
        from safetensors.torch import load_file

        index = os.path.join(path, "model.safetensors.index.json")
        files = ["model.safetensors"]
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        from safetensors import safe_open

        listing = []  # every rank reads the headers (names and shapes): no weights
        for file in files:
            with safe_open(os.path.join(path, file), framework="pt") as f:
                listing += [(n, tuple(f.get_slice(n).get_shape())) for n in f.keys()]
        listing.sort()
        state: dict = {}
        if comm.rank == 0:  # rank 0 reads everything
            for file in files:
                state.update(load_file(os.path.join(path, file)))
        kept = []
        for n, s in listing:  # each tensor broadcast whole; every rank keeps its flat 1/N
            t = state.pop(n).contiguous() if comm.rank == 0 else torch.empty(s)
            comm.broadcast(t, src=0)
            flat = t.reshape(-1)
            k = -(-flat.numel() // comm.world_size)
            kept.append(flat[comm.rank * k : (comm.rank + 1) * k].clone())
            del t, flat
    elif mode == "lora":
        cfg = _config(shape, factory="llama_lora")
        s = build_strategy(cfg.parallel, build_run_model(cfg, None, []), spec, comm)
        ids = torch.randint(0, shape["vocab"], (1, 32), generator=torch.Generator().manual_seed(comm.rank))
        with s.accumulate(True):
            out = s.model(ids).logits
            torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1)).backward()
        s.finish_gradients()
        s.optimizer_step()
        mem = s.memory_bytes()
        frozen = sum(p.numel() for u in s.frozen_units for p in u.params) * 4
        trainable = sum(p.numel() for u in s.units for p in u.params) * 4
        formula = frozen / comm.world_size + trainable * 4 / comm.world_size
        result = {
            "state_bytes": _all_ranks(comm, sum(mem.values())),
            "formula_bytes": formula,
            "frozen_bytes": frozen,
            "trainable_bytes": trainable,
        }
    added = _all_ranks(comm, peak_added(base))
    comm.barrier()
    comm.close()
    if comm.rank == 0:
        write_result({"added_mb": added, **result})


# -- driver ---------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a 40M-parameter model (about a minute)")
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--layers", type=int, default=None, help="override the number of layers")
    ap.add_argument("--out", default=os.path.join("results", "big_model.json"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--path", default="", help=argparse.SUPPRESS)
    ns = ap.parse_args()
    if ns.worker:
        worker(ns.worker, json.loads(ns.shape), ns.path)
        from disttrain.teardown import leave

        leave(0)  # as our workers end (a rank's transport threads must not abort the interpreter's exit)
    shape = dict(QUICK if ns.quick else FULL)
    if ns.layers:
        shape["layers"] = ns.layers
    nbytes = model_bytes(shape)
    shard_mb = nbytes / ns.world / 2**20
    tmp = tempfile.mkdtemp(prefix="big-model-")
    ckpt = os.path.join(tmp, "llama")

    def job(mode: str, world: int) -> dict:
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--worker",
            mode,
            "--shape",
            json.dumps(shape),
            "--path",
            ckpt,
        ]
        return spawn_job(cmd, world, timeout=3600)

    try:
        res = {m: job(m, ns.world) for m in ("init", "fsdp2")}
        job("save", 1)
        res.update({m: job(m, ns.world) for m in ("pretrained", "rank0", "lora")})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratio = {m: [a / shard_mb for a in r["added_mb"]] for m, r in res.items()}
    lora = res["lora"]
    ratio["lora"] = [b / lora["formula_bytes"] for b in lora["state_bytes"]]  # the per-rank figure of that row
    lora_ratio = max(lora["state_bytes"]) / lora["formula_bytes"]
    figures = {
        "init_peak_vs_shard": max(ratio["init"]),
        "fsdp2_init_peak_vs_shard": max(ratio["fsdp2"]),
        "pretrained_load_peak_vs_shard": max(ratio["pretrained"]),
        "rank0_load_peak_vs_shard": ratio["rank0"][0],
        "lora_zero3_state_vs_formula": lora_ratio,
    }
    goals = {"init_peak_vs_shard": 1.5, "pretrained_load_peak_vs_shard": 1.5, "lora_zero3_state_vs_formula": 1.1}
    params = nbytes // 4
    rows = [
        [k, f"{v:.2f}", f"<= {goals[k]}" if k in goals else "peer", " ".join(f"{x:.2f}" for x in ratio.get(m, []))]
        for (k, v), m in zip(figures.items(), ["init", "fsdp2", "pretrained", "rank0", "lora"])
    ]
    print_table(
        f"Llama {params / 1e9:.2f}B parameters ({nbytes / 2**30:.2f} GiB fp32), {ns.world} ranks, "
        f"shard {shard_mb:.0f} MiB per rank",
        ["figure", "value", "goal", "per rank"],
        rows,
    )
    write_json(
        ns.out,
        {
            "shape": shape,
            "parameters": params,
            "model_bytes": nbytes,
            "world": ns.world,
            "figures": figures,
            "goals": goals,
            "per_rank_added_mb": {m: r["added_mb"] for m, r in res.items()},
            "lora": lora,
        },
    )
    print(f"wrote {ns.out}")


if __name__ == "__main__":
    main()
