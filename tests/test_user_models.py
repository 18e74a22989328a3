"""Your own model, data and loss: the examples (a transformers GPT-2 on Shakespeare and a transformers
ResNet on upsampled digits) trained from YAML import targets and from a script with its own loop,
through real ``disttrain run`` / ``disttrain launch`` processes.

Equivalence: N ranks give one process's parameters on the same global batch, read from each run's
final checkpoint. Tolerance ATOL (absolute, every parameter, after 6 steps): the layouts differ only
in the float32 summation order of gradients (per-rank partial sums, then the allreduce or
reduce-scatter), slightly amplified by Adam's normalisation. The ResNet's BatchNorm runs in train
mode with ``parallel.sync_batchnorm: true`` (statistics of the global batch), and its running
statistics (checkpointed buffers) are compared too.
A killed-and-resumed run is compared bit for bit with the uninterrupted one.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from disttrain.checkpoint import CheckpointReader, resolve

pytestmark = pytest.mark.timeout(1200)  # several launches of transformers models: slow on a loaded machine
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPT2 = os.path.join(ROOT, "examples", "gpt2_shakespeare")
RESNET = os.path.join(ROOT, "examples", "resnet_digits")
ATOL = 2e-5
FAST = ["train.steps=6", "train.log_every=3", "train.eval_every=0", "train.eval_samples=32", "checkpoint.every=3"]
GPT2_ARGS = [*FAST, "train.batch_size=6", "model.kwargs.seq_len=32", "data.kwargs.seq_len=32"]
RESNET_ARGS = [*FAST, "train.batch_size=12", "parallel.sync_batchnorm=true"]


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "disttrain.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def _params(run_dir: str) -> dict:
    """model.* tensors of the run's newest checkpoint."""
    reader = CheckpointReader(resolve(run_dir)[0])
    out = {}
    for name in sorted(n for n in reader.names if n.startswith("model.")):
        shape = reader.shape(name)
        out[name] = reader(name, shape, tuple((0, s) for s in shape))
    assert out and reader.state()["step"] == 6
    return out


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _run(tmp_path_factory, yaml: str, name: str, nproc: int, *extra: str, env: dict | None = None) -> str:
    run_dir = str(tmp_path_factory.mktemp(name))
    _cli("run", yaml, "--nproc", str(nproc), f"run.dir={run_dir}", *extra, env=env)
    return run_dir


@pytest.fixture(scope="module")
def gpt2_runs(tmp_path_factory):
    yaml = os.path.join(GPT2, "gpt2.yaml")
    return {
        "one": _run(tmp_path_factory, yaml, "gpt2-1", 1, *GPT2_ARGS),
        "ddp2": _run(tmp_path_factory, yaml, "gpt2-ddp2", 2, *GPT2_ARGS),
    }


def test_gpt2_yaml_two_and_three_ranks_equal_one_process(gpt2_runs, tmp_path_factory):
    one = _params(gpt2_runs["one"])
    # The tied head is stored once, under the embedding's name, and recorded as its alias.
    assert "model.transformer.wte.weight" in one and "model.lm_head.weight" not in one, sorted(one)
    aliases = CheckpointReader(resolve(gpt2_runs["one"])[0]).state()["model"]["aliases"]
    assert aliases == {"lm_head.weight": "transformer.wte.weight"}, aliases
    ddp2 = _params(gpt2_runs["ddp2"])
    assert _max_diff(one, ddp2) <= ATOL, f"ddp on 2 ranks: {_max_diff(one, ddp2)}"
    zero = _params(
        _run(tmp_path_factory, os.path.join(GPT2, "gpt2.yaml"), "gpt2-z2", 3, *GPT2_ARGS, "parallel.strategy=zero2")
    )
    assert _max_diff(one, zero) <= ATOL, f"zero2 on 3 ranks: {_max_diff(one, zero)}"


def test_gpt2_own_loop_script_equals_yaml(gpt2_runs, tmp_path):
    run_dir = str(tmp_path / "script")
    script = os.path.join(GPT2, "train.py")
    p = _cli(
        "launch",
        "--nproc-per-node",
        "2",
        script,
        os.path.join(GPT2, "gpt2.yaml"),
        f"run.dir={run_dir}",
        *GPT2_ARGS,
    )
    assert "eval loss" in p.stdout, p.stdout[-2000:]
    diff = _max_diff(_params(gpt2_runs["ddp2"]), _params(run_dir))
    # Same data, model, loss and optimizer groups; the user's optimizer is scheduled per group
    # (base lr x schedule factor instead of the schedule of the peak lr): rounding-level differences.
    assert diff <= 1e-6, diff


def test_gpt2_own_loop_script_under_tp2_equals_dp2(gpt2_runs, tmp_path):
    """The script's own loss reads whole logits under tensor parallel (parallel.tp.loss_parallel is
    off for the own loop): tp=2 trains what dp=2 trains, and reports the same eval loss."""
    script, yaml = os.path.join(GPT2, "train.py"), os.path.join(GPT2, "gpt2.yaml")
    losses = {}
    for name, layout in (("dp2", []), ("tp2", ["parallel.mesh.tp=2"])):
        run_dir = str(tmp_path / name)
        p = _cli("launch", "--nproc-per-node", "2", script, yaml, f"run.dir={run_dir}", *GPT2_ARGS, *layout)
        losses[name] = float(p.stdout.split("eval loss ")[1].split()[0])
        if name == "tp2":
            diff = _max_diff(_params(gpt2_runs["ddp2"]), _params(run_dir))
            assert diff <= ATOL, f"tp=2 own loop vs dp=2: parameters differ by {diff}"
    assert abs(losses["tp2"] - losses["dp2"]) <= 1e-4, losses


def test_gpt2_tied_head_across_pipeline_stages_saves_resumes_and_consolidates(gpt2_runs, tmp_path):
    """pp=2 at dp=1: wte (first stage) and the tied lm_head (last stage) are one tensor held by two ranks.
    The checkpoints on disk commit (one copy written), a killed rank's group resumes from step 3 and
    ends equal to one process, and the consolidated file strict-loads with lm_head.weight == wte."""
    from safetensors.torch import load_file

    from disttrain.checkpoint.cli import main as ckpt

    run_dir = str(tmp_path / "pp2")
    p = _cli("run", os.path.join(GPT2, "gpt2.yaml"), "--nproc", "2", f"run.dir={run_dir}", *GPT2_ARGS,
             "parallel.mesh.pp=2", "launch.max_restarts=1", "checkpoint.async_save=false",
             env={"DISTTRAIN_CKPT_TEST_HOOK": "kill@step_end:1:4"})  # fmt: skip
    assert "resumed from" in p.stdout and "step_000003" in p.stdout, p.stdout[-3000:]
    diff = _max_diff(_params(gpt2_runs["one"]), _params(run_dir))
    assert diff <= ATOL, f"pp=2 resumed vs one process: {diff}"
    out = str(tmp_path / "pp2.safetensors")
    assert ckpt(["consolidate", run_dir, out]) == 0
    sd = load_file(out)
    _build_gpt2(seq_len=32).load_state_dict(sd, strict=True)
    assert torch.equal(sd["lm_head.weight"], sd["transformer.wte.weight"])


def _build_gpt2(**kwargs):
    sys.path.insert(0, GPT2)
    try:
        from shakespeare_gpt2 import build_model
    finally:
        sys.path.remove(GPT2)
    return build_model(**kwargs)


def _check_fine_tune(
    tmp_path_factory, name: str, kwargs: dict, layouts: dict[str, list[str]], reshard_to: str = "zero2:2"
) -> dict[str, str]:
    """Each layout equals one process (ATOL), the frozen parameters in its checkpoint are the initial
    ones bit for bit, the trained ones moved, its consolidated file strict-loads into a fresh model, and
    ``ckpt reshard --check --to reshard_to`` says yes. Returns {layout: run dir}."""
    from safetensors.torch import load_file

    from disttrain.checkpoint.cli import main as ckpt
    from disttrain.config import ExperimentConfig
    from disttrain.session import seed_everything

    seed_everything(ExperimentConfig().run.seed)  # the workers' seed, then the same build: the initial model
    initial = _build_gpt2(seq_len=32, **kwargs)
    frozen = {f"model.{n}": p.detach().clone() for n, p in initial.named_parameters() if not p.requires_grad}
    trained = {f"model.{n}" for n, p in initial.named_parameters() if p.requires_grad}
    assert frozen and trained
    cli = {k: f"[{','.join(v)}]" if isinstance(v, list) else v for k, v in kwargs.items()}
    args = [*GPT2_ARGS, *(f"model.kwargs.{k}={v}" for k, v in cli.items())]
    yaml = os.path.join(GPT2, "gpt2.yaml")
    one = _params(_run(tmp_path_factory, yaml, f"{name}-1", 1, *args))
    dirs = {}
    for layout, (nproc, *extra) in layouts.items():
        run_dir = dirs[layout] = _run(tmp_path_factory, yaml, f"{name}-{layout}", int(nproc), *args, *extra)
        got = _params(run_dir)
        assert _max_diff(one, got) <= ATOL, f"{name} under {layout}: {_max_diff(one, got)}"
        for n, t in frozen.items():
            assert torch.equal(got[n], t), f"{name} under {layout}: frozen {n} changed"
        assert any(not torch.equal(got[n], initial.state_dict()[n[6:]]) for n in trained), f"{layout}: no training"
        out = str(tmp_path_factory.mktemp(f"{name}-{layout}-out") / "model.safetensors")
        assert ckpt(["consolidate", run_dir, out]) == 0
        _build_gpt2(seq_len=32, **kwargs).load_state_dict(load_file(out), strict=True)
        assert ckpt(["reshard", run_dir, "--check", "--to", reshard_to]) == 0, f"{name} under {layout}"
    return dirs


def test_lora_fine_tune_under_ddp_zero_tp_and_pp_equals_one_process(tmp_path_factory):
    """peft LoRA adapters (rank 4 on c_attn and c_fc) on a frozen GPT-2, 2 ranks. Under tp2 the plan
    splits each peft layer with its base (c_attn, a Conv1D: q, k, v chunks of the base's and lora_B's
    output features; lora_A whole); under pp2 the adapters go with their blocks' stages."""
    layouts = {"ddp": ["2"], "zero2": ["2", "parallel.strategy=zero2"], "zero3": ["2", "parallel.strategy=zero3"],
               "tp2": ["2", "parallel.mesh.tp=2"], "pp2": ["2", "parallel.mesh.pp=2"]}  # fmt: skip
    _check_fine_tune(tmp_path_factory, "lora", {"lora_r": 4}, layouts)


def test_frozen_parameters_under_tp2_and_pp2_equal_one_process(tmp_path_factory):
    """A frozen position embedding (replicated under tp) and a frozen first MLP (sliced under tp, on
    the first pipeline stage), and a frozen final norm (on the last stage): in every checkpoint,
    unchanged, consolidated strictly. ``ckpt reshard --check`` says yes for the pp2 checkpoint (its
    frozen list is every rank's, not rank 0's alone), and it does reshard: the run resumes as zero2."""
    layouts = {"tp2": ["2", "parallel.mesh.tp=2"], "pp2": ["2", "parallel.mesh.pp=2"]}
    freeze = ["transformer.wpe.weight", "transformer.h.0.mlp.*", "transformer.ln_f.*"]
    dirs = _check_fine_tune(tmp_path_factory, "frozen", {"freeze": freeze}, layouts)
    before = _params(dirs["pp2"])
    args = [a for a in GPT2_ARGS if not a.startswith("train.steps=")] + ["train.steps=7", "parallel.strategy=zero2"]
    p = _cli("run", os.path.join(GPT2, "gpt2.yaml"), "--nproc", "2", f"run.dir={dirs['pp2']}", *args,
             f"model.kwargs.freeze=[{','.join(freeze)}]")  # fmt: skip
    assert "resumed from" in p.stdout and "step_000006" in p.stdout, p.stdout[-3000:]
    reader = CheckpointReader(resolve(dirs["pp2"])[0])
    assert reader.state()["step"] == 7
    for n in ("model.transformer.ln_f.weight", "model.transformer.wpe.weight"):
        shape = reader.shape(n)
        assert torch.equal(reader(n, shape, tuple((0, s) for s in shape)), before[n]), f"frozen {n} changed"


def test_killed_rank_resumes_at_the_same_sample(gpt2_runs, tmp_path):
    # Rank 1 is SIGKILLed after step 4; the launcher restarts the group, which resumes from the
    # step-3 checkpoint (saved synchronously here, so it is committed before the kill), DataLoader
    # worker processes reading from the restored data position.
    run_dir = str(tmp_path / "killed")
    p = _cli(
        "run",
        os.path.join(GPT2, "gpt2.yaml"),
        "--nproc",
        "2",
        f"run.dir={run_dir}",
        *GPT2_ARGS,
        "launch.max_restarts=1",
        "checkpoint.async_save=false",
        "data.num_workers=1",
        env={"DISTTRAIN_CKPT_TEST_HOOK": "kill@step_end:1:4"},
    )
    assert "resumed from" in p.stdout and "step_000003" in p.stdout, p.stdout[-3000:]
    killed, clean = _params(run_dir), _params(gpt2_runs["ddp2"])
    for name in clean:
        assert killed[name].equal(clean[name]), name


def test_resnet_yaml_ranks_equal_one_process(tmp_path_factory):
    yaml = os.path.join(RESNET, "resnet.yaml")
    one = _params(_run(tmp_path_factory, yaml, "resnet-1", 1, *RESNET_ARGS))
    two = _params(_run(tmp_path_factory, yaml, "resnet-z1", 2, *RESNET_ARGS, "parallel.strategy=zero1"))
    assert any(n.endswith("normalization.weight") for n in one)
    assert any(n.endswith("running_mean") and float(one[n].abs().max()) > 0 for n in one)  # buffers, trained
    assert _max_diff(one, two) <= ATOL, f"zero1 on 2 ranks: {_max_diff(one, two)}"
