"""Rank functions for the model-parallel tests: train a tiny GPT on Shakespeare through the
real Trainer, then write this rank's state as Shards (the checkpoint view) for the test
to assemble into full logical tensors."""

from __future__ import annotations

import os
import tempfile

import torch
import yaml

import collectives
from disttrain import config as config_mod
from disttrain.observe import Callback
from disttrain.session import build_trainer

BASE = {
    "run": {"name": "mp", "dir": "runs/mp", "seed": 0},
    "model": {"kind": "gpt", "n_layer": 4, "n_head": 4, "d_model": 32, "seq_len": 16},
    "data": {"kind": "shakespeare", "plays": ["macbeth_gut"]},
    "optim": {"name": "adamw", "lr": 0.003, "weight_decay": 0.01, "grad_clip": 1.0},
    "schedule": {"kind": "cosine", "warmup_steps": 2},
    "train": {"steps": 6, "batch_size": 8, "log_every": 1, "eval_every": 0},
    "checkpoint": {"enabled": False},
}


def make_config(overrides: list[str]) -> config_mod.ExperimentConfig:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(BASE, f)
    try:
        return config_mod.load(f.name, overrides)
    finally:
        os.unlink(f.name)


def _full_shards(model) -> list[dict]:
    return [
        {
            "name": f"model.{n}",
            "tensor": p.detach().clone(),
            "global_shape": tuple(p.shape),
            "box": tuple((0, s) for s in p.shape),
        }
        for n, p in model.named_parameters()
    ]


def assemble(paths: list[str]) -> dict[str, torch.Tensor]:
    """Full logical tensors from the shards every rank wrote (boxes never left empty)."""
    full: dict[str, torch.Tensor] = {}
    for path in paths:
        for sh in torch.load(path):
            t = full.setdefault(sh["name"], torch.full(tuple(sh["global_shape"]), float("nan")))
            t[tuple(slice(a, b) for a, b in sh["box"])] = sh["tensor"].float()
    missing = [k for k, v in full.items() if torch.isnan(v).any()]
    if missing:
        raise AssertionError(f"no rank wrote some boxes of {missing[:5]}")
    return full


def _reader(full: dict[str, torch.Tensor]):
    def read(name, global_shape, box, flat):
        t = full[name]
        if tuple(t.shape) != tuple(global_shape):
            raise KeyError(f"{name}: shape {tuple(t.shape)} != {tuple(global_shape)}")
        for d, (a, b) in enumerate(box):
            t = t.narrow(d, a, b - a)
        return t.clone()

    return read


class _StopAt(Callback):
    def __init__(self, step):
        self.at = step

    def on_step_end(self, trainer):
        if trainer.step >= self.at:
            trainer.stop_requested = True


def _train_one(comm, run: dict, out_dir: str) -> dict:
    from disttrain.optim import build_optimizer_spec
    from disttrain.parallel.model_parallel import build_model_parallel

    cfg = make_config(run.get("overrides", []) + [f"run.dir={out_dir}/rundir"])
    trainer = build_trainer(cfg, comm)
    trainer.run_dir = None
    if run.get("force_mp"):  # a pure-dp layout through the model-parallel strategy (ZeRO-1, resharding)
        from disttrain.models import build_model
        from disttrain.session import seed_everything

        seed_everything(cfg.run.seed)  # a fresh model: the default strategy hooked the first one
        trainer.model = build_model(cfg.model, 0, trainer.task.num_classes)
        spec = build_optimizer_spec(cfg.optim, trainer.model)  # the trainer's no-decay groups
        trainer.strategy = build_model_parallel(cfg.parallel, trainer.model, spec, comm)
    if run.get("eval"):
        return trainer.evaluate(max_samples=64)
    if run.get("load_from"):
        trainer.strategy.load_state_shards(_reader(torch.load(run["load_from"])))
        trainer.step = run["start_step"]
    if run.get("stop_at"):
        trainer.callbacks.append(_StopAt(run["stop_at"]))
    trainer.evaluate = lambda max_samples=64: {}  # the end-of-run eval is tested by the "eval" runs
    trainer.fit()
    s = trainer.strategy
    if hasattr(s, "mesh"):
        shards = [
            {"name": x.name, "tensor": x.tensor.detach().clone(), "global_shape": x.global_shape, "box": x.box}
            for x in s.state_shards()
        ]
    else:
        shards = _full_shards(trainer.model)
        for name, p in trainer.model.named_parameters():
            for key, v in s.optimizer.state.get(p, {}).items():
                shards.append(
                    {
                        "name": f"optim.{name}.{key}",
                        "tensor": v.clone(),
                        "global_shape": tuple(v.shape),
                        "box": tuple((0, n) for n in v.shape),
                    }
                )
    torch.save(shards, os.path.join(out_dir, f"rank{comm.rank}.pt"))
    comm.barrier()
    if run.get("save_full") and comm.rank == 0:  # the "checkpoint": full logical tensors
        torch.save(assemble([os.path.join(out_dir, f"rank{r}.pt") for r in range(comm.world_size)]), run["save_full"])
    comm.barrier()
    return {"losses": [h["loss"] for h in trainer.history]}


def _vocab_ce(comm) -> dict:
    """Vocab-parallel cross-entropy on tp=world vs F.cross_entropy on the full logits."""
    import torch.nn.functional as F

    from disttrain.parallel.mesh import build_mesh
    from disttrain.parallel.tensor.parallel import split_range
    from disttrain.parallel.tensor.vocab import vocab_parallel_cross_entropy

    mesh = build_mesh(comm, dp=1, tp=comm.world_size)
    g = torch.Generator().manual_seed(1)
    logits, target = torch.randn(24, 70, generator=g) * 3, torch.randint(0, 70, (24,), generator=g)
    full = logits.clone().requires_grad_(True)
    want = F.cross_entropy(full, target, reduction="sum")
    want.backward()
    a, b = split_range(70, mesh.size("tp"), mesh.index("tp"))
    mine = logits[:, a:b].clone().requires_grad_(True)
    got = vocab_parallel_cross_entropy(mine, target, mesh.group("tp"), a)
    got.backward()
    return {"loss_diff": abs(float(got) - float(want)), "grad_diff": float((mine.grad - full.grad[:, a:b]).abs().max())}


def train_many(runs: list[dict], out_dir: str) -> dict:
    """One world, many layouts in turn (the expensive part of a test is starting processes).

    A run is {"name", "overrides", ...}; its shards go to ``out_dir/<name>/rank<r>.pt``. A run
    with "expect_error" returns the refusal message instead.
    """
    comm = collectives.init("torch", timeout=300)
    results = {}
    for run in runs:
        d = os.path.join(out_dir, run["name"])
        os.makedirs(d, exist_ok=True)
        if run.get("vocab_ce"):
            results[run["name"]] = _vocab_ce(comm)
            continue
        if run.get("expect_error"):
            try:
                _train_one(comm, run, d)
                results[run["name"]] = {"error": ""}
            except Exception as exc:  # noqa: BLE001 - the message is what is under test
                results[run["name"]] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        results[run["name"]] = _train_one(comm, run, d)
    comm.barrier()
    comm.close()
    return results
