"""transformers models for benchmarks/data_parallel.py: GPT2LMHeadModel and ResNetForImageClassification
built from their configs, the same loop around our strategy (``HFOurs``) and around torch DDP / FSDP2
(``HFPlain``), and the activation memory a forward holds for backward (``hf_activation_bytes``)."""

from __future__ import annotations

import os

HF_GPT2 = {  # 10.3M parameters (lm_head tied to wte)
    "n_layer": int(os.environ.get("BENCH_HF_LAYERS", 4)),
    "n_embd": int(os.environ.get("BENCH_HF_DMODEL", 384)),
    "n_head": 6,
    "vocab_size": 8192,
    "n_positions": 128,
}
HF_RESNET = {"hidden_sizes": [32, 64, 128, 256], "depths": [1, 1, 1, 1], "embedding_size": 32}


def _hf_model(kind: str):
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(
            **HF_GPT2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0
        )
        return transformers.GPT2LMHeadModel(cfg)
    cfg = transformers.ResNetConfig(num_channels=3, layer_type="basic", num_labels=10, **HF_RESNET)
    return transformers.ResNetForImageClassification(cfg)


def _hf_batch(kind: str, n: int, seq: int, step: int, rank: int):
    import torch

    g = torch.Generator().manual_seed(step * 1009 + rank)
    if kind == "gpt2":
        x = torch.randint(0, HF_GPT2["vocab_size"], (n, seq), generator=g)
        return x, x
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def _hf_loss(kind: str, model, x, y, world: int):
    """The loss summed over this rank's units (tokens or images) over the global count."""
    import torch.nn.functional as F

    if kind == "gpt2":
        logits = model(input_ids=x).logits[:, :-1]
        s = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1), reduction="sum")
        return s / (y[:, 1:].numel() * world)
    return F.cross_entropy(model(pixel_values=x).logits, y, reduction="sum") / (len(y) * world)


class HFOurs:
    """A user's loop around our strategy (build_strategy + accumulate/finish/clip/step/zero)."""

    def __init__(self, comm, kind: str, strategy: str, n: int, seq: int, **parallel):
        import torch

        from disttrain.config import ParallelConfig
        from disttrain.parallel import OptimizerSpec, build_strategy

        self.kind, self.n, self.seq, self.rank, self.world = kind, n, seq, comm.rank, comm.world_size
        cfg = ParallelConfig.model_validate({"strategy": strategy, **parallel})
        spec = OptimizerSpec(
            lambda g: torch.optim.AdamW(g, lr=1e-4), lambda name, p: (("weight_decay", 0.0),) if p.ndim < 2 else ()
        )
        self.s = build_strategy(cfg, _hf_model(kind), spec, comm)
        self.i, self.last = 0, 0.0

    def step(self) -> None:
        x, y = _hf_batch(self.kind, self.n, self.seq, self.i, self.rank)
        with self.s.accumulate(True):
            loss = _hf_loss(self.kind, self.s.model, x, y, self.world)
            loss.backward()
        self.s.finish_gradients()
        self.s.clip_grad_norm(1.0)
        self.s.optimizer_step()
        self.s.zero_grad()
        self.last, self.i = float(loss.detach()), self.i + 1


class HFPlain:
    """The same loop with torch DDP (gloo), or FSDP2 ``fully_shard`` on the given unit classes."""

    def __init__(self, kind: str, n: int, seq: int, rank: int, world: int, wrap: str = "ddp"):
        import torch

        from disttrain.parallel.strategy import OptimizerSpec

        self.kind, self.n, self.seq, self.rank, self.world = kind, n, seq, rank, world
        self.model = _hf_model(kind)
        if wrap == "ddp":
            self.model = torch.nn.parallel.DistributedDataParallel(self.model)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            from disttrain.parallel.units import find_units

            mesh = init_device_mesh("cpu", (world,))
            for _, m in find_units(self.model):
                fully_shard(m, mesh=mesh)
            fully_shard(self.model, mesh=mesh)
        spec = OptimizerSpec(
            lambda g: torch.optim.AdamW(g, lr=1e-4), lambda name, p: (("weight_decay", 0.0),) if p.ndim < 2 else ()
        )
        self.opt = spec.build_for(self.model.named_parameters())
        self.no_sync, self.i, self.last, self.peak_state_bytes = False, 0, 0.0, 0

    def step(self) -> None:
        import contextlib

        import torch

        x, y = _hf_batch(self.kind, self.n, self.seq, self.i, self.rank)
        ctx = self.model.no_sync() if self.no_sync else contextlib.nullcontext()
        with ctx:
            loss = _hf_loss(self.kind, self.model, x, y, self.world)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        if self.i < 2:  # sizes are fixed once the optimizer state exists; gradients are still held here
            self.peak_state_bytes = max(self.peak_state_bytes, self.state_bytes())
        self.opt.zero_grad(set_to_none=True)
        self.last, self.i = float(loss.detach()), self.i + 1

    def state_bytes(self) -> int:
        import torch

        def local(t):
            t = t.to_local() if isinstance(t, torch.distributed.tensor.DTensor) else t
            return t.numel() * t.element_size()

        ps = list(self.model.parameters())
        optim = sum(local(v) for st in self.opt.state.values() for v in st.values() if isinstance(v, torch.Tensor))
        return sum(local(p) for p in ps) + sum(local(p.grad) for p in ps if p.grad is not None) + optim


def _heap_in_use() -> int:
    """Bytes glibc's malloc has handed out (arena + mmapped chunks): where torch's CPU tensors live."""
    import ctypes

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(f, ctypes.c_size_t) for f in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]  # fmt: skip

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Mallinfo2
    m = libc.mallinfo2()
    return m.uordblks + m.hblkhd


def hf_activation_bytes(n: int, seq: int) -> dict:
    """Memory held between forward and backward (activations saved for backward), GPT-2, one process,
    without and with activation checkpointing of its blocks; min over 3 tries each."""
    from disttrain.parallel.units import apply_activation_checkpointing, find_units

    out = {}
    for ac in (False, True):
        model = _hf_model("gpt2")
        if ac:
            apply_activation_checkpointing(find_units(model))
        best = None
        for i in range(3):
            x, y = _hf_batch("gpt2", n, seq, i, 0)
            before = _heap_in_use()
            loss = _hf_loss("gpt2", model, x, y, 1)
            held = _heap_in_use() - before
            loss.backward()
            model.zero_grad(set_to_none=True)
            del loss
            best = held if best is None else min(best, held)
        out["ac" if ac else "no_ac"] = best
    return out
