"""Rank functions for data parallel / ZeRO equivalence: many short trainings in one spawn.

Each run is (variant, strategy); every rank runs the same list in the same order over one
communicator and returns, per run, the logged losses, every parameter (gathered whole)
and the checkpoint shards it would save (so the test can check names and boxes).
"""

from __future__ import annotations

import functools
import json
import os

import torch
import torch.nn as nn

import collectives
from disttrain import config as config_mod
from disttrain.data import build_task
from disttrain.models import build_model
from disttrain.session import seed_everything
from disttrain.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIGITS = os.path.join(ROOT, "configs", "digits.yaml")

BASE = [
    "train.steps=4",
    "train.log_every=1",
    "train.eval_every=0",
    "schedule.warmup_steps=2",
    "train.batch_size=50",
    "train.grad_accum=2",
    "optim.grad_clip=0.2",
    "optim.lr=0.01",
]
GPT_YAML = os.path.join(ROOT, "configs", "gpt-shakespeare.yaml")
GPT = [
    "model.n_layer=2",
    "model.n_head=2",
    "model.d_model=32",
    "model.seq_len=16",
    "data.plays=[hamlet_gut]",
    "train.batch_size=6",
    "train.steps=3",
    "train.log_every=1",
    "train.eval_every=0",
    "schedule.warmup_steps=1",
    "optim.weight_decay=0.0",
]
VARIANTS = {
    "adamw": BASE,
    "sgd": BASE + ["optim.name=sgd", "optim.momentum=0.9", "optim.lr=0.05"],
    "tiny": BASE + ["train.batch_size=4"],  # 4 samples over 3 ranks x 2 micro-batches: some are empty
    "unused": BASE,  # with BranchyMLP
    "bf16": BASE + ["train.precision=bf16", "train.steps=3"],
    "wire_bf16": BASE + ["parallel.grad_dtype=bf16", "train.steps=3"],
    "bf16_params": BASE + ["train.precision=bf16", "train.steps=3"],  # the model's parameters stored in bf16
    "gpt": GPT,
}


class BranchyMLP(nn.Module):
    """Blocks plus an ``aux`` head that only samples with pixel 1 lit (about 8%) go through: a
    micro-batch without one leaves ``aux`` out of the graph (no gradient on that rank and step),
    while each sample's output is the same however the batch is split."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.Linear(n_in, 48), nn.GELU()), nn.Sequential(nn.Linear(48, 32), nn.GELU())]
        )
        self.aux = nn.Linear(32, n_out)
        self.head = nn.Linear(32, n_out)

    def forward(self, x):
        mask = x[:, 1] > 0.07
        for b in self.blocks:
            x = b(x)
        out = self.head(x)
        return out + self.aux(x) * mask[:, None] if bool(mask.any()) else out


def _full_params(trainer) -> dict[str, list[float]]:
    s = trainer.strategy
    if hasattr(s, "full_parameters"):
        named = s.full_parameters()
    else:
        named = {n: p.detach() for n, p in trainer.model.named_parameters()}
    return {n: t.float().reshape(-1).tolist() for n, t in named.items()}


def _shards(strategy) -> list:
    return [
        {
            "name": sh.name,
            "shape": list(sh.global_shape),
            "box": [list(b) for b in sh.box],
            "flat": sh.flat,
            "data": sh.tensor.detach().float().reshape(-1).tolist(),
        }
        for sh in strategy.state_shards()
    ]


def _logical(paths: list[str]) -> dict[str, torch.Tensor]:
    """Whole logical tensors from every rank's saved shards (a stand-in for the checkpoint reader)."""
    out: dict[str, torch.Tensor] = {}
    for path in paths:
        for name, tensor, shape, box, flat in torch.load(path):
            t = out.setdefault(name, torch.zeros(shape))
            if flat:
                t.view(-1)[box[0][0] : box[0][1]] = tensor.reshape(-1)
            else:
                t[tuple(slice(a, b) for a, b in box)] = tensor
    return out


def _read_from(logical: dict[str, torch.Tensor]):
    def read(name, shape, box, flat):
        t = logical[name]
        if tuple(t.shape) != tuple(shape):
            raise KeyError(f"{name}: checkpoint shape {tuple(t.shape)} != {tuple(shape)}")
        if flat:
            return t.reshape(-1)[box[0][0] : box[0][1]].clone()
        return t[tuple(slice(a, b) for a, b in box)].clone()

    return read


def reshard_check(comm, trainer, variant: str, targets: list[str], tmpdir: str) -> dict[str, float]:
    """Save ``trainer``'s shards (every rank a file), load them into fresh trainers with each target
    strategy, and return, per target, the largest difference between its shards and the saved state."""
    os.makedirs(tmpdir, exist_ok=True)
    path = os.path.join(tmpdir, f"shards.{comm.rank}.pt")
    torch.save(
        [
            (sh.name, sh.tensor.clone(), tuple(sh.global_shape), tuple(sh.box), sh.flat)
            for sh in trainer.strategy.state_shards()
        ],
        path,
    )
    comm.barrier()
    logical = _logical([os.path.join(tmpdir, f"shards.{r}.pt") for r in range(comm.world_size)])
    comm.barrier()
    out = {}
    for target in targets:
        fresh, _ = _build(comm, variant, target)
        fresh.strategy.load_state_shards(_read_from(logical))
        diff = 0.0
        for sh in fresh.strategy.state_shards():
            want = _read_from(logical)(sh.name, sh.global_shape, sh.box, sh.flat)
            diff = max(diff, float((sh.tensor.reshape(-1) - want.reshape(-1)).abs().max()) if want.numel() else 0.0)
        names = {sh.name for sh in fresh.strategy.state_shards()}
        if comm.world_size == 1 and names != set(logical):
            raise AssertionError(f"{target}: names differ: {sorted(names ^ set(logical))}")
        out[target] = diff
    return out


@functools.cache
def _task(data_json: str, seed: int, seq_len):
    """Tasks are read-only: build each once per process (loading digits/Shakespeare costs seconds here)."""
    from disttrain.config import ExperimentConfig

    data = ExperimentConfig.model_validate({"data": json.loads(data_json)}).data
    return build_task(data, seed, seq_len=seq_len)


def _build(comm, variant: str, strategy: str):
    cfg = config_mod.load(
        GPT_YAML if variant == "gpt" else DIGITS,
        VARIANTS[variant]
        + [f"parallel.strategy={strategy}", "parallel.bucket_mb=0.01", "parallel.first_bucket_mb=0.002"],
    )
    seed_everything(cfg.run.seed)
    task = _task(cfg.data.model_dump_json(), cfg.run.seed, getattr(cfg.model, "seq_len", None))
    if variant == "unused":
        model = BranchyMLP(task.train_x.shape[1], task.num_classes)
    else:
        num_inputs = task.train_x.shape[1] if not task.is_lm else 0
        model = build_model(cfg.model, num_inputs, task.num_classes)
    if variant == "bf16_params":
        model = model.to(torch.bfloat16)
    return Trainer(cfg, comm, model, task, None), cfg


def run_one(comm, variant: str, strategy: str, reshard: list[str] | None = None, tmpdir: str | None = None) -> dict:
    trainer, _ = _build(comm, variant, strategy)
    summary = trainer.fit()
    extra = {"reshard": reshard_check(comm, trainer, variant, reshard, tmpdir)} if reshard else {}
    return {
        **extra,
        "losses": [h["loss"] for h in trainer.history],
        "norms": [h["grad_norm"] for h in trainer.history],
        "params": _full_params(trainer),
        "shards": _shards(trainer.strategy),
        "memory": trainer.strategy.memory_bytes(),
        "dtypes": sorted({str(p.dtype) for p in trainer.strategy.model.parameters()}),
        "eval": summary["final_eval_loss"],
    }


def equivalence_case(
    runs: list[list[str]], backend: str = "torch", reshard: dict | None = None, tmpdir: str | None = None
) -> dict:
    """``reshard``: {"variant/strategy": [target strategies]} to save/load-check after that run."""
    comm = collectives.init(backend, timeout=120)
    out = {}
    try:
        for variant, strategy in runs:
            key = f"{variant}/{strategy}"
            out[key] = run_one(
                comm,
                variant,
                strategy,
                (reshard or {}).get(key),
                os.path.join(tmpdir, key.replace("/", "_")) if tmpdir else None,
            )
        comm.barrier()
    finally:
        comm.close()
    return out


# -- the matrix the tests read: few spawns, each running many (variant, strategy) pairs --------
STRATEGIES = ["ddp", "zero1", "zero2", "zero3"]
PLAN = {
    (2, "torch"): [(v, s) for v in ("adamw", "gpt") for s in STRATEGIES]
    + [
        ("sgd", "ddp"),
        ("sgd", "zero1"),
        ("sgd", "zero3"),
        ("bf16", "ddp"),
        ("bf16", "zero2"),
        ("bf16", "zero3"),
        ("wire_bf16", "ddp"),
        ("wire_bf16", "zero2"),
        ("bf16_params", "ddp"),
        ("bf16_params", "zero1"),
        ("bf16_params", "zero3"),
    ],
    (3, "torch"): [(v, s) for v in ("adamw", "unused") for s in STRATEGIES],
    (2, "shm"): [(v, s) for v in ("adamw",) for s in STRATEGIES] + [("gpt", "zero3")],
    (3, "shm"): [(v, s) for v in ("adamw", "tiny") for s in STRATEGIES],
}
RESHARD = {  # after these runs, save their shards and load them into each target strategy
    (2, "torch"): {"adamw/zero3": STRATEGIES, "sgd/zero1": ["ddp", "zero3"]},
    (3, "shm"): {"adamw/ddp": ["zero2", "zero3"], "adamw/zero2": ["ddp", "zero1"]},
}
_cache: dict = {}


def results(world: int, backend: str) -> list[dict] | None:
    """Per-rank results of the planned runs at (world, backend); world 1 is the reference (ddp on one
    process, every variant). None if the backend is not registered here. Spawned once per session."""
    from collectives import registry
    from tests.support.harness import spawn

    if backend not in registry.known():
        return None
    key = (world, backend)
    if key not in _cache:
        import shutil
        import tempfile

        runs = [[v, "ddp"] for v in VARIANTS] if world == 1 else [list(r) for r in PLAN[key]]
        tmp = tempfile.mkdtemp(prefix="dp-zero-shards-")
        try:
            _cache[key] = spawn(
                "tests.cases.dp_zero:equivalence_case",
                world,
                timeout=600,
                args={"runs": runs, "backend": backend, "reshard": RESHARD.get(key, {}), "tmpdir": tmp},
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return _cache[key]


def assemble(per_rank: list[dict], key: str) -> dict[str, torch.Tensor]:
    """Logical tensors from every rank's shards of run ``key`` (boxes fill them; flat boxes index
    the flattened tensor). Checks that the boxes cover each tensor exactly once (replicas agree)."""
    out: dict[str, torch.Tensor] = {}
    seen: dict[str, torch.Tensor] = {}
    for res in per_rank:
        for sh in res[key]["shards"]:
            shape = tuple(sh["shape"])
            if sh["name"] not in out:
                out[sh["name"]] = torch.zeros(shape)
                seen[sh["name"]] = torch.zeros(shape, dtype=torch.int32)
            t, s = out[sh["name"]], seen[sh["name"]]
            data = torch.tensor(sh["data"])
            if sh["flat"]:
                ((a, b),) = sh["box"]
                t.view(-1)[a:b] = data
                s.view(-1)[a:b] = 1
            else:
                idx = tuple(slice(a, b) for a, b in sh["box"])
                t[idx] = data.view(t[idx].shape)
                s[idx] = 1
    for name, s in seen.items():
        if not bool(s.all()):
            raise AssertionError(f"{key}: shards of {name} do not cover it ({int(s.sum())}/{s.numel()} elements)")
    return out
