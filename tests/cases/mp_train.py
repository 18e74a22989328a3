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
from disttrain.worker import build_trainer

BASE = {
    "run": {"name": "mp", "dir": "runs/mp", "seed": 0},
    "model": {"kind": "gpt", "n_layer": 4, "n_head": 4, "d_model": 32, "seq_len": 16},
    "data": {"kind": "shakespeare", "plays": ["macbeth_gut"]},
    "optim": {"name": "adamw", "lr": 0.003, "weight_decay": 0.01, "grad_clip": 1.0},
    "schedule": {"kind": "cosine", "warmup_steps": 2},
    "train": {"steps": 6, "batch_size": 8, "log_every": 1, "eval_every": 0},
}


def make_config(overrides: list[str]) -> config_mod.ExperimentConfig:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(BASE, f)
    try:
        return config_mod.load(f.name, overrides)
    finally:
        os.unlink(f.name)


def _full_shards(model) -> list[dict]:
    return [{"name": f"model.{n}", "tensor": p.detach().clone(), "global_shape": tuple(p.shape),
             "box": tuple((0, s) for s in p.shape)} for n, p in model.named_parameters()]


def train_mp(overrides: list[str], out_dir: str, load_from: str | None = None, start_step: int = 0,
             force_mp: bool = False) -> dict:
    """Train; write ``out_dir/rank{r}.pt`` (this rank's shards). ``load_from``: a file of full
    logical tensors to resume from at ``start_step``. ``force_mp``: use the model-parallel
    strategy even for a pure-dp layout (to load a checkpoint through its resharding)."""
    cfg = make_config(overrides)
    comm = collectives.init("torch", check=cfg.launch.check_collectives, timeout=120)
    trainer = build_trainer(cfg, comm)
    trainer.run_dir = None
    trainer.cfg.train.eval_every = 0
    if force_mp:
        from disttrain.parallel.model_parallel import ModelParallel
        from disttrain.trainer import build_optimizer

        trainer.strategy = ModelParallel(trainer.model, lambda ps: build_optimizer(cfg.optim, ps), comm, cfg.parallel)
    if load_from:
        full = torch.load(load_from)

        def read(name, global_shape, box, flat):
            t = full[name]
            if tuple(t.shape) != tuple(global_shape):
                raise KeyError(f"{name}: shape {tuple(t.shape)} != {tuple(global_shape)}")
            for d, (a, b) in enumerate(box):
                t = t.narrow(d, a, b - a)
            return t.clone()

        trainer.strategy.load_state_shards(read)
        trainer.step = start_step
    trainer.evaluate = lambda max_samples=64: {}  # end-of-run eval is not under test here
    trainer.fit()
    s = trainer.strategy
    if hasattr(s, "state_shards") and hasattr(s, "mesh"):
        shards = [{"name": x.name, "tensor": x.tensor.detach().clone(), "global_shape": x.global_shape,
                   "box": x.box} for x in s.state_shards()]
    else:
        shards = _full_shards(trainer.model)
        for p_name, p in trainer.model.named_parameters():
            for key, v in s.optimizer.state.get(p, {}).items():
                if isinstance(v, torch.Tensor):
                    shards.append({"name": f"optim.{p_name}.{key}", "tensor": v.clone(), "global_shape": tuple(v.shape),
                                   "box": tuple((0, n) for n in v.shape)})
    torch.save(shards, os.path.join(out_dir, f"rank{comm.rank}.pt"))
    comm.barrier()
    comm.close()
    return {"losses": [h["loss"] for h in trainer.history]}


def eval_mp(overrides: list[str]) -> dict:
    """The end-of-run evaluation through strategy.model (full logits on every rank)."""
    cfg = make_config(overrides + ["train.steps=1"])
    comm = collectives.init("torch", timeout=120)
    trainer = build_trainer(cfg, comm)
    trainer.run_dir = None
    out = trainer.evaluate(max_samples=64)
    comm.barrier()
    comm.close()
    return out


def bad_layouts(cases: list[list[str]]) -> list[str]:
    """Build a strategy for each layout; return each refusal message ('' if it was accepted)."""
    comm = collectives.init("torch", timeout=120)
    msgs = []
    for ovr in cases:
        cfg = make_config(ovr)
        try:
            trainer = build_trainer(cfg, comm)
            del trainer
            msgs.append("")
        except Exception as exc:  # noqa: BLE001 - the message is what is under test
            msgs.append(f"{type(exc).__name__}: {exc}")
    comm.barrier()
    comm.close()
    return msgs
