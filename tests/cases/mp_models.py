"""Rank functions for tensor/pipeline parallel on users' models: transformers Llama and GPT-2
built from their configs, and a user's own small transformer with a plan given as YAML would.

Each run trains a few AdamW steps (clip 1.0) through :class:`ModelParallel` (or, for the
reference, a plain single-process loop) on fixed random token batches, then writes this
rank's state as Shards for the test to assemble into full logical tensors.
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import collectives

VOCAB, SEQ, BATCH, STEPS = 96, 16, 8, 3


# -- models -----------------------------------------------------------------------------------
class UserAttention(nn.Module):
    def __init__(self, d: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d // n_heads  # n_heads is adjusted per tp rank by the plan
        self.dropout = dropout  # on the attention probabilities: a tp-sharded region (this rank's heads)
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        # Shapes from the projections' outputs: under sequence parallelism x holds 1/tp of the tokens.
        q, k, v = (m(x) for m in (self.q, self.k, self.v))
        b, t = q.shape[:2]
        q, k, v = (z.view(b, t, self.n_heads, self.head_dim).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class UserBlock(nn.Module):
    def __init__(self, d: int, n_heads: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = UserAttention(d, n_heads, dropout)
        self.ff_in, self.ff_out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.ff_out(F.gelu(self.ff_in(self.norm2(x)))))


class UserLM(nn.Module):
    """A user's own transformer: no positional embedding (causal attention is enough here), so
    every stage is a plain sequence and sequence parallelism applies from the embedding on."""

    def __init__(self, vocab: int = VOCAB, d: int = 32, n_heads: int = 4, n_layer: int = 2, dropout: float = 0.0):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(UserBlock(d, n_heads, dropout) for _ in range(n_layer))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.emb(ids)
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x))


USER_PLAN = {  # as it would be written under parallel.tp.plan
    "emb": "vocab",
    "blocks.*.attn.[qkv]": "colwise",
    "blocks.*.attn.out": "rowwise",
    "blocks.*.ff_in": "colwise",
    "blocks.*.ff_out": "rowwise",
    "head": "colwise_gather",
}
USER_SP_PLAN = {**USER_PLAN, "blocks.*.norm[12]": "sequence", "blocks.*.drop": "sequence", "norm": "sequence"}


def parallelize_user(model: nn.Module, mesh) -> nn.Module:
    """A ``parallel.tp.parallelize`` hook: what a plan says, applied by hand (torchtitan's shape)."""
    from disttrain.parallel.tensor.plan import apply_plan

    return apply_plan(model, mesh, USER_PLAN)


def build(kind: str, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    if kind == "user":
        return UserLM(dropout=dropout)
    import transformers

    transformers.logging.set_verbosity_error()
    if kind == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            bos_token_id=0,
            eos_token_id=1,
        )
        return transformers.LlamaForCausalLM(cfg)
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=0,
        eos_token_id=1,
    )
    return transformers.GPT2LMHeadModel(cfg)


def llama_model(**kwargs) -> nn.Module:
    """``model.target`` for the YAML test: the transformers Llama above."""
    return build("llama")


def token_data(n: int = 64):
    """``data.target``: (train, eval) lists of {"input_ids", "labels"} windows of random tokens."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (n + 16, SEQ + 1), generator=g)
    rows = [{"input_ids": r[:-1].clone(), "labels": r[1:].clone()} for r in ids]
    return rows[:n], rows[n:]


def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def loss_fn(out, y):
    from disttrain.parallel.tensor.vocab import cross_entropy

    logits = out.logits if hasattr(out, "logits") else out
    return cross_entropy(logits, y, reduction="sum") / (BATCH * SEQ)  # over the global batch


class _Front(nn.Module):
    def __init__(self, m: UserLM):
        super().__init__()
        self.emb, self.block = m.emb, m.blocks[0]

    def forward(self, ids):  # a dict with a bool and an int16 tensor beside the activations
        return {"h": self.block(self.emb(ids)), "extra": (ids >= 0, ids.to(torch.int16))}


class _Back(nn.Module):
    def __init__(self, m: UserLM):
        super().__init__()
        self.block, self.norm, self.head = m.blocks[1], m.norm, m.head

    def forward(self, x):
        keep, ids16 = x["extra"]
        assert keep.dtype == torch.bool and ids16.dtype == torch.int16
        return self.head(self.norm(self.block(x["h"])))


def split_user(model: UserLM, num_stages: int) -> list[nn.Module]:
    """A ``parallel.pipeline.split`` target: the stage modules, built by the user."""
    assert num_stages == 2
    return [_Front(model), _Back(model)]


def lm_step(model, batch):
    """A user's step function, as in examples/: whole logits and torch's cross-entropy."""
    out = model(input_ids=batch["input_ids"])
    logits = out.logits if hasattr(out, "logits") else out
    labels = batch["labels"]
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), reduction="sum"
    ), labels.numel()


def parallel_cfg(
    dp, tp, pp, schedule="1f1b", v=1, plan=None, strategy="ddp", split=None, mb=4, loss_parallel=True, parallelize=None
):
    from disttrain.config import ParallelConfig

    return ParallelConfig.model_validate(
        {
            "strategy": strategy,
            "mesh": {"dp": dp, "tp": tp, "pp": pp},
            "pipeline": {"schedule": schedule, "microbatches": mb, "virtual_stages": v, "split": split},
            "tp": {"plan": plan, "loss_parallel": loss_parallel, "parallelize": parallelize},
        }
    )


# -- runs -------------------------------------------------------------------------------------
def _shard_dicts(shards) -> list[dict]:
    return [
        {"name": s.name, "tensor": s.tensor.detach().clone(), "global_shape": s.global_shape, "box": s.box}
        for s in shards
    ]


def _reader(full: dict[str, torch.Tensor]):
    def read(name, global_shape, box, flat):
        t = full[name]
        if tuple(t.shape) != tuple(global_shape):
            raise KeyError(f"{name}: shape {tuple(t.shape)} != {tuple(global_shape)}")
        for d, (a, b) in enumerate(box):
            t = t.narrow(d, a, b - a)
        return t.clone()

    return read


def _reference(run: dict, out_dir: str) -> dict:
    """One process, no strategy: the plain model, AdamW, clip_grad_norm_."""
    model = build(run["model"], run.get("dropout", 0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, eps=1e-6)
    start, losses = 0, []
    if run.get("load_from"):
        deadline = time.monotonic() + 300
        while not os.path.exists(run["load_from"]) and time.monotonic() < deadline:  # written by the 4-rank world
            time.sleep(0.2)
        full = torch.load(run["load_from"])
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()  # materialise the state (this step's weight decay is overwritten below)
        opt.zero_grad()
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(full[f"model.{n}"])
                for k, v in opt.state[p].items():
                    v.copy_(full[f"optim.{n}.{k}"])
        start = run["start_step"]
    for step in range(start, run.get("steps", STEPS)):
        x, y = batches(step)
        loss = loss_fn(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    shards = []
    for n, p in model.named_parameters():
        shards.append(
            {
                "name": f"model.{n}",
                "tensor": p.detach().clone(),
                "global_shape": tuple(p.shape),
                "box": tuple((0, s) for s in p.shape),
            }
        )
        for k, v in opt.state[p].items():
            shards.append(
                {
                    "name": f"optim.{n}.{k}",
                    "tensor": v.clone(),
                    "global_shape": tuple(v.shape),
                    "box": tuple((0, s) for s in v.shape),
                }
            )
    torch.save(shards, os.path.join(out_dir, "rank0.pt"))
    return {"losses": losses}


def _strategy(comm, run: dict):
    from disttrain.parallel import OptimizerSpec, build_strategy
    from disttrain.parallel.model_parallel import build_model_parallel

    model = build(run["model"], run.get("dropout", 0.0))
    spec = OptimizerSpec(build=lambda groups: torch.optim.AdamW(groups, lr=3e-3, weight_decay=0.01, eps=1e-6))
    if run.get("ddp"):  # plain data parallel, the strategy build_strategy picks for dp only
        return build_strategy(parallel_cfg(comm.world_size, 1, 1), model, spec, comm)
    return build_model_parallel(parallel_cfg(**run["layout"]), model, spec, comm, seed=0)


def _train(comm, run: dict, out_dir: str) -> dict:
    torch.manual_seed(0)
    s = _strategy(comm, run)
    if run.get("load_from"):
        if run.get("forget_tp_stream"):  # the control: resume without the sharded-region dropout stream
            s.rng.load = lambda state: None
        s.load_state_shards(_reader(torch.load(run["load_from"])))
        if run.get("rng_from"):
            torch.set_rng_state(torch.load(run["rng_from"])[comm.rank])
    dp_rank, dp_size = getattr(s, "dp_rank", comm.rank), getattr(s, "dp_size", comm.world_size)
    losses = []
    for step in range(run.get("start_step", 0), run.get("stop_at", run.get("steps", STEPS))):
        x, y = batches(step)
        lo, hi = dp_rank * BATCH // dp_size, (dp_rank + 1) * BATCH // dp_size
        x, y = x[lo:hi], y[lo:hi]
        if run.get("step_fn"):  # the user's own step function, through the pipeline's stand-ins
            from disttrain.parallel.pipeline.step import is_transformers_model, run_step_fn

            batch = {"input_ids": x, "labels": y}
            hf = is_transformers_model(s.inner)
            loss_sum, count = run_step_fn(s, lm_step, [batch], BATCH * SEQ, lambda r: (r[0], r[1]), hf)
            assert count == y.numel(), (count, y.numel())
            loss = loss_sum / (BATCH * SEQ)
        elif hasattr(s, "forward_backward"):
            loss = s.forward_backward([(x, y)], loss_fn)
        else:
            with s.accumulate(True):
                out = loss_fn(s.model(x), y)
                out.backward()
            loss = float(out.detach())
        s.finish_gradients()
        s.clip_grad_norm(1.0)
        s.optimizer_step()
        s.zero_grad()
        t = torch.tensor([loss], dtype=torch.float64)
        comm.allreduce(t, collectives.ReduceOp.SUM)
        losses.append(float(t) / (comm.world_size // dp_size))
    torch.save(_shard_dicts(s.state_shards()), os.path.join(out_dir, f"rank{comm.rank}.pt"))
    if run.get("save_rng"):
        mine = torch.get_rng_state().view(torch.int32)  # the communicator moves int32, not uint8
        states = [torch.empty_like(mine) for _ in range(comm.world_size)]
        comm.allgather(states, mine)
        states = [s.view(torch.uint8) for s in states]
        if comm.rank == 0:
            torch.save(states, run["save_rng"])
    comm.barrier()
    if run.get("save_full") and comm.rank == 0:
        from tests.cases.mp_train import assemble

        full = assemble([os.path.join(out_dir, f"rank{r}.pt") for r in range(comm.world_size)])
        torch.save(full, run["save_full"] + ".tmp")
        os.replace(run["save_full"] + ".tmp", run["save_full"])  # another world polls for it
    comm.barrier()
    return {"losses": losses}


def many(runs: list[dict], out_dir: str) -> dict:
    """One world, many runs in turn. A run is {"name", "model", "layout"|"ddp"|"reference", ...};
    a run with "expect_error" returns the error's type and message instead."""
    comm = collectives.init("torch", timeout=300) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    results = {}
    for run in runs:
        d = os.path.join(out_dir, run["name"])
        os.makedirs(d, exist_ok=True)
        if run.get("reference"):
            results[run["name"]] = _reference(run, d)
            continue
        if run.get("expect_error"):
            try:
                _train(comm, run, d)
                results[run["name"]] = {"error": ""}
            except Exception as exc:  # noqa: BLE001 - the message is what is under test
                from disttrain.errors import ConfigError

                results[run["name"]] = {"error": str(exc), "config_error": isinstance(exc, ConfigError)}
            continue
        results[run["name"]] = _train(comm, run, d)
    if comm is not None:
        comm.barrier()
        comm.close()
    return results
