"""Rank functions: transformers models (GPT-2 with its tied lm_head, ResNet with BatchNorm) under every
data-parallel strategy, against a plain single-process torch loop on the same global batches.

Models are built from their ``*Config`` (no download), tiny. Data: GPT-2 reads seeded random token
ids; ResNet reads scikit-learn's digits upsampled to 3x32x32. Every step's global batch is
``GlobalBatchSampler``'s (a pure function of seed and step), split contiguously over ranks; the loss
is summed over units (tokens or images) and divided by the global count, so N ranks' summed
gradient is one process's. The optimizer is AdamW with two parameter groups (no weight decay for
biases and norm weights), so ZeRO's per-group flat runs are exercised.

A run is ``{"model", "strategy", "steps", ...}``; :func:`train_case` runs a list of them on one
communicator and returns, per run, losses, every parameter and buffer (whole), and the eval loss.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

import collectives
from disttrain.config import ExperimentConfig
from disttrain.data.sampler import GlobalBatchSampler
from disttrain.parallel import OptimizerSpec, build_strategy
from disttrain.parallel.buffers import persistent_buffers
from disttrain.schedule import Schedule

SEQ, VOCAB, N_TOKENS_SAMPLES = 16, 64, 96
LR, WD, CLIP = 1e-2, 0.1, 1.0


# -- models and data --------------------------------------------------------------------------
def build_model(kind: str, seed: int = 0):
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(
            n_layer=2,
            n_embd=32,
            n_head=2,
            vocab_size=VOCAB,
            n_positions=SEQ,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
        return transformers.GPT2LMHeadModel(cfg)
    cfg = transformers.ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=10
    )
    return transformers.ResNetForImageClassification(cfg)


@functools.cache
def dataset(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of the whole train set, and the last 16 samples serve as the eval batch."""
    if kind == "gpt2":
        g = torch.Generator().manual_seed(1234)
        x = torch.randint(0, VOCAB, (N_TOKENS_SAMPLES, SEQ), generator=g)
        return x, x
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[:240], dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return x, torch.tensor(d.target[:240])


def loss_sum(kind: str, model, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(loss summed over units, units): next-token CE over tokens, or CE over images."""
    if kind == "gpt2":
        logits = model(input_ids=x).logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1), reduction="sum"), y[
            :, 1:
        ].numel()
    return F.cross_entropy(model(pixel_values=x).logits, y, reduction="sum"), y.numel()


def no_decay(name: str, p) -> tuple:
    return (("weight_decay", 0.0),) if p.ndim < 2 else ()


def optimizer_spec() -> OptimizerSpec:
    return OptimizerSpec(lambda groups: torch.optim.AdamW(groups, lr=LR, weight_decay=WD), no_decay)


def units_per_sample(kind: str) -> int:
    return SEQ - 1 if kind == "gpt2" else 1


@torch.no_grad()
def eval_loss(kind: str, model) -> float:
    """Mean loss on the fixed eval batch (every rank the same batch: ZeRO-3 gathers collectively)."""
    x, y = dataset(kind)
    was = model.training
    model.eval()
    s, n = loss_sum(kind, model, x[-16:], y[-16:])
    model.train(was)
    return float(s) / n


def state_of(model, strategy=None) -> dict:
    from disttrain.parallel.zero.strategy import Zero

    if isinstance(strategy, Zero):
        params = strategy.full_parameters()
    else:
        params = {n: p.detach() for n, p in model.named_parameters()}
    return {
        "params": {n: t.float().reshape(-1).tolist() for n, t in params.items()},
        "buffers": {n: b.float().reshape(-1).tolist() for n, b in persistent_buffers(model)},
    }


# -- the reference: plain torch, one process ---------------------------------------------------
def reference_case(runs: list[dict]) -> dict:
    out = {}
    for run in runs:
        kind, steps, batch = run["model"], run["steps"], run["batch"]
        model = build_model(kind)
        model.train()
        spec = optimizer_spec()
        opt = spec.build_for(model.named_parameters())
        x, y = dataset(kind)
        sampler = GlobalBatchSampler(len(x) - 16, batch, 0)
        losses = []
        for step in range(steps):
            idx = sampler.global_batch(step)
            s, _ = loss_sum(kind, model, x[idx], y[idx])
            loss = s / (batch * units_per_sample(kind))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        out[run["key"]] = {"losses": losses, **state_of(model), "eval": eval_loss(kind, model)}
    return out


# -- a training run through disttrain's strategies (and, with a run dir, its checkpointer) -------
class Run:
    """The loop a user writes around a strategy; also the checkpointer's ``TrainingRun``."""

    def __init__(self, comm, run: dict, run_dir: str | None = None):
        self.comm, self.kind, self.batch = comm, run["model"], run["batch"]
        parallel = {"strategy": run["strategy"], "bucket_mb": 0.01, "first_bucket_mb": 0.002}
        parallel.update(run.get("parallel", {}))
        self.cfg = ExperimentConfig.model_validate(
            {"parallel": parallel, "checkpoint": {"every": 0, "keep": 3}, "train": {"batch_size": self.batch}}
        )
        self.model = build_model(self.kind, seed=comm.rank)  # rank 0's weights must win the broadcast
        self.model.train()
        self.strategy = build_strategy(self.cfg.parallel, self.model, optimizer_spec(), comm)
        # Forward calls of leaf modules during training: activation checkpointing recomputes some in backward.
        self.leaf_forwards, self._counting = 0, False
        for m in self.model.modules():
            if not list(m.children()):
                m.register_forward_hook(self._count_forward)
        x, _ = dataset(self.kind)
        self.sampler = GlobalBatchSampler(len(x) - 16, self.batch, 0, comm.rank, comm.world_size)
        self.step, self.stop_requested, self.run_dir = 0, False, run_dir
        self.losses: list[float] = []
        self.ckpt = None
        self.schedule = Schedule(lambda: self.strategy.optimizer)  # a constant LR: nothing to save or step
        if run_dir is not None:
            from disttrain.checkpoint import Checkpointer

            self.ckpt = Checkpointer(self.cfg.checkpoint, comm)
            self.ckpt.attach(self, os.path.join(run_dir, "checkpoints"))

    def _count_forward(self, module, args, output) -> None:
        self.leaf_forwards += self._counting

    def lr(self, step: int) -> float:
        return LR

    def notify_checkpoint(self, step: int, path: str) -> None:
        pass

    def train_step(self) -> None:
        x, y = dataset(self.kind)
        idx = self.sampler.local_batch(self.step)
        s = self.strategy
        self._counting = True
        with s.accumulate(True):
            part, _ = loss_sum(self.kind, s.model, x[idx], y[idx])
            loss = part / (self.batch * units_per_sample(self.kind))
            loss.backward()
        self._counting = False
        s.finish_gradients()
        s.clip_grad_norm(CLIP)
        if self.ckpt is not None:
            self.ckpt.before_optimizer_step(self)  # waits for an async save's snapshot
        s.optimizer_step()
        s.zero_grad()
        total = loss.detach().reshape(1).double()
        self.comm.allreduce(total, collectives.ReduceOp.SUM)
        self.losses.append(float(total))
        self.step += 1

    def result(self) -> dict:
        return {
            "losses": self.losses,
            **state_of(self.model, self.strategy),
            "eval": eval_loss(self.kind, self.model),
            "leaf_forwards": self.leaf_forwards,
        }


def train_case(runs: list[dict], backend: str = "torch") -> dict:
    """Each run: train ``steps`` steps. With ``run_dir``: resume from its newest checkpoint first, and
    save (asynchronously) at each step in ``save_at`` and at the end. ``world: 1`` runs on rank 0 alone."""
    comm = collectives.init(backend, timeout=120)
    out = {}
    try:
        for run in runs:
            c = comm
            if run.get("world") == 1:  # rank 0 alone, on a communicator of its own: a 1-rank job
                c = comm.new_group([0])
                if c is None:
                    continue
            r = Run(c, run, run.get("run_dir"))
            resumed = r.ckpt.resume(r) if r.ckpt and run.get("resume") else None
            after_load = state_of(r.model, r.strategy) if resumed is not None else None
            while r.step < run["steps"]:
                r.train_step()
                if r.ckpt and r.step in run.get("save_at", []):
                    r.ckpt.save(r, sync=False)
            if r.ckpt and not run.get("resume"):  # resumed runs leave the saved checkpoints as they are
                r.ckpt.on_train_end(r)
            res = r.result()
            res["resumed_from"] = resumed
            if after_load is not None:
                res["after_load"] = after_load
            out[run["key"]] = res
        comm.barrier()
    finally:
        comm.close()
    return out


# -- the matrix the tests read: two spawns (2 ranks; then 3 ranks, and rank 0 alone, resuming its checkpoints) --
STRATEGIES = ["ddp", "zero1", "zero2", "zero3"]
STEPS, BATCH, SAVE_AT = 4, 12, 2


def _equivalence_runs() -> list[dict]:
    return [
        {
            "key": f"{m}/{s}",
            "model": m,
            "strategy": s,
            "steps": STEPS,
            "batch": BATCH,
            "parallel": {"sync_batchnorm": m == "resnet"},
        }
        for m in ("gpt2", "resnet")
        for s in STRATEGIES
    ]


def plan(tmp: str) -> dict:
    """Runs per world size. The 2-rank spawn also trains GPT-2 under ZeRO-3 (and ResNet under ddp with
    sync BN) to step 2 with a checkpoint; the 3-rank spawn (and its rank 0 alone) resumes them with other
    strategies."""
    gpt_dir, res_dir = os.path.join(tmp, "gpt2-zero3"), os.path.join(tmp, "resnet-ddp")
    two = _equivalence_runs() + [
        {"key": "gpt2/zero3+ac", "model": "gpt2", "strategy": "zero3", "steps": STEPS, "batch": BATCH,
         "parallel": {"activation_checkpointing": True}},
        {"key": "resnet/ddp+ac", "model": "resnet", "strategy": "ddp", "steps": STEPS, "batch": BATCH,
         "parallel": {"activation_checkpointing": True, "sync_batchnorm": True}},
        {"key": "gpt2/zero3/save", "model": "gpt2", "strategy": "zero3", "steps": SAVE_AT, "batch": BATCH,
         "run_dir": gpt_dir},
        {"key": "resnet/ddp/save", "model": "resnet", "strategy": "ddp", "steps": SAVE_AT, "batch": BATCH,
         "run_dir": res_dir, "save_at": [1], "parallel": {"sync_batchnorm": True}},
    ]  # fmt: skip
    resume = [
        {"key": "gpt2/resume", "model": "gpt2", "steps": STEPS, "batch": BATCH, "run_dir": gpt_dir, "resume": True},
        {"key": "resnet/resume", "model": "resnet", "steps": STEPS, "batch": BATCH, "run_dir": res_dir,
         "resume": True, "parallel": {"sync_batchnorm": True}},
    ]  # fmt: skip
    three = _equivalence_runs() + [{**r, "strategy": "zero3" if r["model"] == "gpt2" else "zero2"} for r in resume]
    # then rank 0 alone (after the 3-rank resumes, which save nothing, so both load the 2-rank checkpoint)
    three += [{**r, "key": f"{r['key']}@1", "world": 1, "strategy": "ddp" if r["model"] == "gpt2" else "zero3"}
              for r in resume]  # fmt: skip
    ref = [{"key": m, "model": m, "steps": STEPS, "batch": BATCH} for m in ("gpt2", "resnet")]
    return {"ref": ref, 2: two, 3: three, "dirs": {"gpt2": gpt_dir, "resnet": res_dir}}


_cache: dict = {}


def results(backend: str = "torch") -> dict:
    """{"ref": reference results, 2/3: per-rank results, "dirs": checkpoint run dirs}; spawned once.
    The 1-rank resumes are in rank 0's results of the 3-rank spawn, keyed ``<model>/resume@1``."""
    if backend not in _cache:
        import atexit
        import shutil
        import tempfile

        from tests.support.harness import spawn

        tmp = tempfile.mkdtemp(prefix="hf-strategies-")
        atexit.register(shutil.rmtree, tmp, True)
        p = plan(tmp)
        out = {"ref": reference_case(p["ref"]), "dirs": p["dirs"]}
        for world in (2, 3):  # 3 (and 1) resume what 2 saved
            args = {"runs": p[world], "backend": backend}
            out[world] = spawn("tests.cases.hf_strategies:train_case", world, timeout=900, args=args)
        _cache[backend] = out
    return _cache[backend]
