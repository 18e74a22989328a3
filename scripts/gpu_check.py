"""The checks behind scripts/gpu_check.sh: every CUDA path of the project, one table, exit 1 on a failure.

    python scripts/gpu_check.py --out /tmp/gpu     # normally through scripts/gpu_check.sh

Rows: collectives conformance on CUDA tensors for the nccl backend (CuPy) and the torch backend's
nccl process group (one rank per GPU); `disttrain run` on CUDA with the nccl backend for DDP bf16
(with asynchronous checkpoints from CUDA tensors through pinned host buffers, then a resumed run
that loads them back), ZeRO-3 bf16, DDP fp16 with loss scaling, and tensor parallel (2+ GPUs);
a GPT throughput run (bf16 autocast, fused AdamW) reporting tokens/s and MFU against the chip's
dense bf16 peak (the formula of disttrain.observe.throughput); the hang report on nccl (2+ GPUs). A check that needs more GPUs than present is SKIP, not a failure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

ROWS: list[tuple[str, str, float, str]] = []


def row(name: str, fn) -> None:
    t0 = time.monotonic()
    try:
        status, detail = fn()
    except Exception as exc:  # noqa: BLE001 - every failure becomes a row, the others still run
        status, detail = "FAIL", f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:160] if str(exc) else ''}"
        traceback.print_exc()
    ROWS.append((name, status, time.monotonic() - t0, detail))
    print(f"[{status}] {name}: {detail}", flush=True)


def conformance(backend: str, gpus: int):
    from tests.support.harness import spawn

    out = spawn("tests.cases.collective_gpu:conformance", gpus, args={"backend": backend}, timeout=300)
    if not all(o == out[0] for o in out):
        return "FAIL", f"ranks ran different cases: {out}"
    return "PASS", f"{gpus} rank(s): {', '.join(out[0])}"


def disttrain_run(out: str, name: str, gpus: int, overrides: list[str], steps: int = 30, config: str | None = None):
    run_dir = os.path.join(out, name)
    cmd = [
        sys.executable,
        "-m",
        "disttrain.cli",
        "run",
        config or os.path.join(ROOT, "configs", "gpt-shakespeare.yaml"),
        f"run.dir={run_dir}",
        f"run.name=gpu-{name}",
        "launch.device=cuda",
        "launch.backend=nccl",
        f"launch.nproc={gpus}",
        f"train.steps={steps}",
        "train.log_every=10",
        "train.eval_every=0",
        *overrides,
    ]
    with open(os.path.join(out, f"{name}.log"), "w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=420).returncode
    summary_path = os.path.join(run_dir, "summary.json")
    if rc != 0 or not os.path.exists(summary_path):
        with open(os.path.join(out, f"{name}.log")) as f:
            tail = f.read()[-1500:]
        print(tail, flush=True)
        return "FAIL", f"exit {rc}; log {out}/{name}.log"
    with open(summary_path) as f:
        summary = json.load(f)
    loss = summary.get("final_loss")
    if loss is None or not math.isfinite(loss) or summary.get("steps") != steps:
        return "FAIL", f"summary {summary}"
    return "PASS", f"{summary['steps']} steps, final loss {loss:.3f}, {summary.get('wall_time_s', 0):.1f}s"


def hang_report(out: str):
    """Rank 1 of a 2-GPU nccl job stops forever in its step: the launcher names it and the line."""
    config = os.path.join(out, "hang.yaml")
    with open(config, "w") as f:
        f.write(
            f"run: {{name: gpu-hang, dir: {os.path.join(out, 'hang')}}}\n"
            "launch: {nproc: 2, backend: nccl, device: cuda, hang_timeout: 5, timeout: 120}\n"
            "model: {kind: mlp, hidden: [16]}\ndata: {kind: digits}\n"
            'loss: {target: "tests.cases.hang_step:step"}\n'
            "train: {steps: 50, batch_size: 32, log_every: 100}\ncheckpoint: {enabled: false}\n"
        )
    proc = subprocess.run(
        [sys.executable, "-m", "disttrain.cli", "run", config], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    text = proc.stdout + proc.stderr
    with open(os.path.join(out, "hang.log"), "w") as f:
        f.write(text)
    behind = [line for line in text.splitlines() if "BEHIND rank 1@" in line]
    if proc.returncode == 0 or not behind or "hang_step.py:" not in behind[0]:
        return "FAIL", f"exit {proc.returncode}; log {out}/hang.log"
    return "PASS", behind[0].strip()[:140]


def checkpoint_roundtrip(out: str, gpus: int):
    """Async checkpoints from CUDA tensors (pinned host buffers), then a second run resumes from them."""
    status, detail = disttrain_run(
        out, "ckpt_bf16", gpus, ["train.precision=bf16", "checkpoint.every=10", "checkpoint.async_save=true"], 20
    )
    if status != "PASS":
        return status, detail
    ckpts = sorted(d for d in os.listdir(os.path.join(out, "ckpt_bf16")) if "step" in d or "ckpt" in d)
    status, detail2 = disttrain_run(
        out, "ckpt_bf16", gpus, ["train.precision=bf16", "checkpoint.every=10", "checkpoint.async_save=true"], 30
    )
    with open(os.path.join(out, "ckpt_bf16.log")) as f:
        resumed = "resum" in f.read().lower()
    if status == "PASS" and not resumed:
        return "FAIL", "the second run did not say it resumed from a checkpoint"
    return status, f"saved {ckpts or '?'}; resumed: {detail2}"


def lora_gpt(vocab_size: int = 256, rank: int = 8):
    """model.target of the LoRA check: the built-in GPT, every weight frozen, LoRA adapters on each block's
    attention and MLP projections (zero at the start)."""
    from disttrain.examples.gpt import GPT

    class LoRA(torch.nn.Module):
        def __init__(self, base: torch.nn.Linear):
            super().__init__()
            self.base, self.out_features = base, base.out_features
            self.a = torch.nn.Linear(base.in_features, rank, bias=False)
            self.b = torch.nn.Linear(rank, base.out_features, bias=False)
            torch.nn.init.zeros_(self.b.weight)

        def forward(self, x):
            return self.base(x) + self.b(self.a(x))

    model = GPT(vocab_size=vocab_size, n_layer=4, n_head=4, d_model=256, seq_len=128)
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.blocks:
        block.attn.proj, block.mlp.fc, block.mlp.proj = LoRA(block.attn.proj), LoRA(block.mlp.fc), LoRA(block.mlp.proj)
    return model


def deferred_init(out: str, gpus: int):
    """ZeRO-3 bf16 from a deferred (meta-device) build equals the eager build's run on the same seed."""
    common = ["train.precision=bf16", "parallel.strategy=zero3"]
    losses = []
    for name, flag in (("deferred_eager", "false"), ("deferred_meta", "true")):
        status, detail = disttrain_run(out, name, gpus, [*common, f"model.deferred_init={flag}"], 20)
        if status != "PASS":
            return status, f"{name}: {detail}"
        with open(os.path.join(out, name, "summary.json")) as f:
            losses.append(json.load(f)["final_loss"])
    if abs(losses[0] - losses[1]) > 2e-2:
        return "FAIL", f"final loss eager {losses[0]:.4f} vs deferred {losses[1]:.4f}"
    return "PASS", f"final loss eager {losses[0]:.4f}, deferred {losses[1]:.4f}"


def pretrained_load(out: str, gpus: int):
    """model.pretrained from the checkpoint the async check wrote, under ZeRO-3 (each rank reads its ranges)."""
    ckpt = os.path.join(out, "ckpt_bf16", "checkpoints")
    if not os.path.isdir(ckpt):
        return "FAIL", f"no checkpoint at {ckpt} (the async checkpoint check did not write one)"
    over = ["train.precision=bf16", "parallel.strategy=zero3", f"model.pretrained={ckpt}", "checkpoint.enabled=false"]
    return disttrain_run(out, "pretrained_zero3", gpus, over, 10)


def lora_zero3(out: str, gpus: int):
    """A LoRA fine-tune (frozen GPT, adapters) under ZeRO-3 in bf16: frozen weights sharded, adapters trained."""
    import yaml

    with open(os.path.join(ROOT, "configs", "gpt-shakespeare.yaml")) as f:
        cfg = yaml.safe_load(f)
    cfg["model"] = {"target": "scripts.gpu_check:lora_gpt", "kwargs": {"vocab_size": 256}}
    path = os.path.join(out, "lora.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return disttrain_run(out, "lora_zero3_bf16", gpus, ["train.precision=bf16", "parallel.strategy=zero3"], 20, path)


def throughput(out: str):
    from disttrain.examples.gpt import GPT
    from disttrain.observe.flops import matmul_params, peak_flops, transformer_flops_per_token

    dev = torch.device("cuda", 0)
    torch.manual_seed(0)
    layers, d, heads, seq, batch, vocab = 12, 768, 12, 1024, 16, 50304
    model = GPT(vocab_size=vocab, n_layer=layers, n_head=heads, d_model=d, seq_len=seq, dropout=0.0).to(dev)
    params = matmul_params(model)  # N without the embedding tables (disttrain.observe.flops)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, vocab, (batch, seq), device=dev)
    y = torch.randint(0, vocab, (batch, seq), device=dev)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits.float().view(-1, vocab), y.view(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    n = 10
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        loss = step()
    end.record()
    torch.cuda.synchronize()
    secs = start.elapsed_time(end) / 1e3 / n
    tokens = batch * seq / secs
    flops_per_token = transformer_flops_per_token(params, layers, d, seq)
    name = torch.cuda.get_device_name(dev)
    peak = peak_flops(str(dev))
    mfu = f"MFU {flops_per_token * tokens / peak:.1%} of {peak / 1e12:.0f} TFLOP/s" if peak else "MFU: peak unknown"
    if not math.isfinite(loss.item()):
        return "FAIL", f"loss {loss.item()}"
    return "PASS", f"GPT {params / 1e6:.0f}M bf16 b{batch}x{seq}: {tokens:,.0f} tokens/s, {mfu} ({name})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp", help="logs and run directories go here")
    args = ap.parse_args()
    out = os.path.join(args.out, "gpu_check")
    os.makedirs(out, exist_ok=True)
    if not torch.cuda.is_available():
        print("gpu_check: FAIL: torch sees no CUDA device\nHINT: run scripts/gpu_check.sh on a GPU node", flush=True)
        return 2
    gpus = torch.cuda.device_count()
    print(f"gpu_check: {gpus} x {torch.cuda.get_device_name(0)}, torch {torch.__version__} (CUDA {torch.version.cuda})")
    row(f"collectives nccl (CuPy), {gpus} rank(s)", lambda: conformance("nccl", gpus))
    row(f"collectives torch (nccl group), {gpus} rank(s)", lambda: conformance("torch", gpus))
    row("train DDP bf16 (nccl)", lambda: disttrain_run(out, "ddp_bf16", gpus, ["train.precision=bf16"]))
    row(
        "train ZeRO-3 bf16 (nccl)",
        lambda: disttrain_run(out, "zero3_bf16", gpus, ["train.precision=bf16", "parallel.strategy=zero3"]),
    )
    row("train DDP fp16 + loss scaling", lambda: disttrain_run(out, "ddp_fp16", gpus, ["train.precision=fp16"]))
    if gpus >= 2:
        tp = [f"parallel.mesh.tp={gpus}", "train.precision=bf16"]
        row(f"train TP={gpus} bf16 (nccl)", lambda: disttrain_run(out, "tp_bf16", gpus, tp))
        row("hang report names rank 1 and its line (nccl)", lambda: hang_report(out))
    else:
        ROWS.append(("train TP bf16 (nccl)", "SKIP", 0.0, "needs 2+ GPUs (TP splits layers across ranks)"))
        ROWS.append(("hang report (nccl)", "SKIP", 0.0, "needs 2 GPUs"))
    row("async checkpoint (pinned) + resume", lambda: checkpoint_roundtrip(out, gpus))
    row("deferred init ZeRO-3 bf16 = eager", lambda: deferred_init(out, gpus))
    row("model.pretrained ZeRO-3 bf16 (checkpoint)", lambda: pretrained_load(out, gpus))
    row("LoRA ZeRO-3 bf16 (frozen base sharded)", lambda: lora_zero3(out, gpus))
    row("GPT throughput (1 GPU)", lambda: throughput(out))

    width = max(len(r[0]) for r in ROWS)
    print("\n" + "check".ljust(width) + "  result  seconds  detail")
    for name, status, secs, detail in ROWS:
        print(f"{name.ljust(width)}  {status:6s}  {secs:7.1f}  {detail}")
    failed = [r[0] for r in ROWS if r[1] == "FAIL"]
    print(f"\ngpu_check: {'FAIL: ' + ', '.join(failed) if failed else 'all CUDA paths passed'} (logs in {out})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
