"""Rank functions: deferred initialisation and ``model.pretrained`` against one eager process.

Each rank builds its model through the worker's ``build_run_model`` and the strategy through
``build_strategy`` (as ``disttrain run`` does) and returns what it keeps: every ``model.*`` piece of
``state_shards()`` (name, box, flat, values) plus its peak resident memory added while building.
The test compares each piece with the same box of the eager single-process model.
"""

from __future__ import annotations

import torch

import collectives
from disttrain.config import ExperimentConfig
from disttrain.parallel import OptimizerSpec, build_strategy
from disttrain.session import build_run_model, seed_everything


# -- model factories (import targets) ----------------------------------------------------------
def llama(layers: int = 2, hidden: int = 32, vocab: int = 64, tie: bool = False):
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=tie,
        attention_dropout=0.0,
    )
    return transformers.LlamaForCausalLM(cfg)


def broken(width: int = 8):
    """A factory that reads a value (``.item()``): it cannot run on the meta device."""
    layer = torch.nn.Linear(width, width)
    if layer.weight.sum().item() > 1e9:
        raise AssertionError("unreachable")
    return layer


def gpt(layers: int = 2, d_model: int = 32, vocab: int = 64):
    from disttrain.examples.gpt import GPT

    return GPT(vocab, n_layer=layers, n_head=2, d_model=d_model, seq_len=16)


def make_config(target: str, kwargs: dict, strategy: str, tp: int = 1, pp: int = 1, **model) -> ExperimentConfig:
    return ExperimentConfig.model_validate(
        {
            "model": {"target": target, "kwargs": kwargs, **model},
            "data": {"target": "tests.cases.deferred:tokens"},
            "parallel": {"strategy": strategy, "mesh": {"tp": tp, "pp": pp}},
            "optim": {"name": "adamw", "lr": 1e-2},
        }
    )


def tokens(n: int = 64, seq: int = 16, vocab: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seq + 1), generator=g)
    return torch.utils.data.TensorDataset(ids[:, :-1], ids[:, 1:]), None


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak() -> float:
    """Reset this process's peak resident memory (Linux: clear_refs 5); returns the resident MiB now."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mb("VmRSS")


def peak_added(base: float) -> float:
    """Peak resident MiB since :func:`reset_peak` above its ``base``."""
    return _status_mb("VmHWM") - base


def kept_case(
    target: str,
    kwargs: dict,
    strategy: str,
    tp: int = 1,
    pp: int = 1,
    model: dict | None = None,
    values: bool = True,
) -> dict:
    """Build and wrap the model as a run does; return this rank's kept pieces and memory."""
    cfg = make_config(target, kwargs, strategy, tp, pp, **(model or {}))
    comm = collectives.init("torch", timeout=120)
    llama(1, 32), gpt(1, 32)  # warm-up: the modules the factories import are loaded before measuring
    seed_everything(cfg.run.seed)
    before = reset_peak()
    m = build_run_model(cfg, None, [])
    spec = OptimizerSpec(build=lambda groups: torch.optim.AdamW(groups, lr=1e-2))
    s = build_strategy(cfg.parallel, m, spec, comm)
    added = peak_added(before)
    pieces = [
        {
            "name": sh.name[len("model.") :],
            "box": [list(b) for b in sh.box],
            "flat": sh.flat,
            "values": sh.tensor.detach().float().reshape(-1).tolist(),
        }
        for sh in s.state_shards()
        if sh.name.startswith("model.") and values
    ]
    comm.barrier()
    comm.close()
    return {"pieces": pieces, "added_mb": added}


def first_loss_case(
    target: str,
    kwargs: dict,
    strategy: str,
    tp: int = 1,
    pp: int = 1,
    model: dict | None = None,
    batch: list | None = None,
) -> float:
    """The loss of ``batch`` (token ids) at the first forward through the strategy's model (every rank)."""
    cfg = make_config(target, kwargs, strategy, tp, pp, **(model or {}))
    comm = collectives.init("torch", timeout=120)
    seed_everything(cfg.run.seed)
    m = build_run_model(cfg, None, [])
    spec = OptimizerSpec(build=lambda groups: torch.optim.AdamW(groups, lr=1e-2))
    s = build_strategy(cfg.parallel, m, spec, comm)
    ids = torch.tensor(batch)
    s.model.eval()
    with torch.no_grad():
        out = s.model(ids)
    logits = out.logits if hasattr(out, "logits") else out
    from disttrain.parallel.tensor.vocab import cross_entropy

    target = torch.cat([ids[:, 1:], torch.full((ids.shape[0], 1), -100)], dim=1)
    loss = float(cross_entropy(logits, target, reduction="mean"))
    comm.barrier()
    comm.close()
    return loss


class LoRALinear(torch.nn.Module):
    """A frozen base linear plus a trainable low-rank update (LoRA), zero at the start."""

    def __init__(self, base: torch.nn.Linear, r: int = 4):
        super().__init__()
        self.base = base
        base.weight.requires_grad_(False)
        self.lora_a = torch.nn.Linear(base.in_features, r, bias=False)
        self.lora_b = torch.nn.Linear(r, base.out_features, bias=False)
        torch.nn.init.zeros_(self.lora_b.weight)

    def forward(self, x):
        return self.base(x) + self.lora_b(self.lora_a(x))


def llama_lora(layers: int = 2, hidden: int = 32, vocab: int = 64, r: int = 4):
    """A Llama whose every weight is frozen, with LoRA adapters on q_proj and v_proj."""
    m = llama(layers, hidden, vocab)
    for p in m.parameters():
        p.requires_grad_(False)
    for layer in m.model.layers:
        layer.self_attn.q_proj = LoRALinear(layer.self_attn.q_proj, r)
        layer.self_attn.v_proj = LoRALinear(layer.self_attn.v_proj, r)
    return m


def train_pieces_case(target: str, kwargs: dict, strategy: str, steps: int = 3) -> dict:
    """``steps`` AdamW steps of a causal-LM loss on fixed token batches (the global batch split over
    ranks); returns every model piece this rank holds after training and its state bytes."""
    cfg = make_config(target, kwargs, strategy)
    comm = collectives.init("torch", timeout=120)
    seed_everything(cfg.run.seed)
    m = build_run_model(cfg, None, [])
    spec = OptimizerSpec(build=lambda groups: torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1))
    s = build_strategy(cfg.parallel, m, spec, comm)
    g = torch.Generator().manual_seed(7)
    for _ in range(steps):
        ids = torch.randint(0, 64, (4, 16), generator=g)
        mine = ids.tensor_split(comm.world_size)[comm.rank]
        with s.accumulate(True):
            logits = s.model(mine).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), mine[:, 1:].reshape(-1), reduction="sum"
            ) / (ids.shape[0] * (ids.shape[1] - 1))
            loss.backward()
        s.finish_gradients()
        s.optimizer_step()
        s.zero_grad()
    pieces = [
        {
            "name": sh.name[len("model.") :],
            "box": [list(b) for b in sh.box],
            "flat": sh.flat,
            "values": sh.tensor.detach().float().reshape(-1).tolist(),
        }
        for sh in s.state_shards()
        if sh.name.startswith("model.")
    ]
    optim_names = sorted({sh.name for sh in s.state_shards() if sh.name.startswith("optim.")})
    mem = s.memory_bytes()
    comm.barrier()
    comm.close()
    return {"pieces": pieces, "memory": mem, "optim_names": optim_names}


def eval_gather_case(layers: int = 6) -> dict:
    """ZeRO-3 over a Llama: the bytes gathered at once during a no_grad forward, and the model's."""
    cfg = make_config("tests.cases.deferred:llama", {"layers": layers, "hidden": 64}, "zero3")
    comm = collectives.init("torch", timeout=120)
    seed_everything(cfg.run.seed)
    spec = OptimizerSpec(build=lambda groups: torch.optim.AdamW(groups, lr=1e-2))
    s = build_strategy(cfg.parallel, build_run_model(cfg, None, []), spec, comm)
    s.peak_transient_bytes = 0
    s.model.eval()
    with torch.no_grad():
        s.model(torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0)))
    root = s.root.gathered_bytes()
    out = {
        "peak_gathered": s.peak_transient_bytes,
        "model_bytes": sum(u.padded * 4 for u in s.units),
        "largest_block": max(u.padded * 4 for u in s.block_units),
        "root": sum(u.padded * 4 for u in s.units if u is s.root),
        "root_left_gathered": root,
    }
    comm.barrier()
    comm.close()
    return out


def save_case(run_dir: str, pretrained: str, strategy: str = "zero3", tp: int = 1) -> str:
    """One training step of the Llama started from ``pretrained``, through the trainer (its checkpoint
    callback saves at the end); returns the newest checkpoint's directory."""
    from disttrain.checkpoint import resolve
    from disttrain.session import build_trainer

    cfg = ExperimentConfig.model_validate(
        {
            "run": {"dir": run_dir},
            "model": {"target": "tests.cases.deferred:llama", "pretrained": pretrained},
            "data": {"target": "tests.cases.deferred:tokens"},
            "parallel": {"strategy": strategy, "mesh": {"tp": tp}},
            "optim": {"name": "adamw", "lr": 1e-2},
            "train": {"steps": 1, "batch_size": 4, "log_every": 1, "eval_every": 0},
            "checkpoint": {"async_save": False},
        }
    )
    comm = collectives.init("torch", timeout=120)
    trainer = build_trainer(cfg, comm)
    trainer.fit()
    trainer.run_dir.close()
    comm.barrier()
    comm.close()
    return resolve(run_dir)[0]
