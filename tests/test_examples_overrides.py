"""Both examples' own-loop train.py honour key=value overrides of the optimizer: they build it from the
YAML's optim section (run.setup(model) without a factory), so `optim.name=AdamW` on the command line
trains with AdamW, whose moments land in the checkpoint. One plain process, two steps."""

import glob
import os
import subprocess
import sys

import pytest
from safetensors import safe_open

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESNET = os.path.join(ROOT, "examples", "resnet_digits")
GPT2 = os.path.join(ROOT, "examples", "gpt2_shakespeare")
pytestmark = pytest.mark.timeout(300)


def _optimizer_state_names(run_dir) -> set[str]:
    (step,) = glob.glob(os.path.join(run_dir, "checkpoints", "step_*"))
    names = set()
    for shard in glob.glob(os.path.join(step, "*.safetensors")):
        with safe_open(shard, "pt") as f:
            names |= {k.rsplit(".", 1)[1] for k in f.keys() if k.startswith("optim.")}
    return names


def test_train_py_builds_the_optimizer_from_the_overridden_optim_section(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("sklearn")
    run_dir = tmp_path / "run"
    cmd = [sys.executable, os.path.join(RESNET, "train.py"), os.path.join(RESNET, "resnet.yaml")]
    overrides = ["train.steps=2", "train.eval_every=0", f"run.dir={run_dir}", "checkpoint.async_save=false"]
    # The YAML says SGD with momentum; the override asks for AdamW (momentum is SGD's, so unset it).
    overrides += ["optim.name=AdamW", "optim.momentum=null", "optim.lr=1e-3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([*cmd, *overrides], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    names = _optimizer_state_names(run_dir)
    assert {"exp_avg", "exp_avg_sq"} <= names and "momentum_buffer" not in names, names


def test_neither_example_hard_codes_an_optimizer():
    for script in (os.path.join(RESNET, "train.py"), os.path.join(GPT2, "train.py")):
        with open(script, encoding="utf-8") as f:
            assert "torch.optim." not in f.read(), f"{script} builds its own optimizer; overrides would not reach it"
