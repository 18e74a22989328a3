"""The demo kinds live in ``disttrain.examples`` and the core reaches them only through registry
entries: importing the core leaves the examples package unloaded, and every entry resolves to the
builder that a ``model.kind``/``data.kind`` config gets."""

import json
import subprocess
import sys

import pytest
import torch

from disttrain.config.data import DigitsData, ShakespeareData
from disttrain.config.model import GPTConfig, MLPConfig
from disttrain.data import TASKS, build_task
from disttrain.errors import DisttrainError
from disttrain.models import MODELS, build_model
from disttrain.parallel.pipeline.split import build_stages, plan_stages
from disttrain.targets import import_target

pytestmark = pytest.mark.unit

CORE = ["disttrain", "disttrain.models", "disttrain.data", "disttrain.parallel.pipeline.split", "disttrain.config"]


def test_importing_the_core_does_not_import_the_examples():
    code = (
        "import importlib, json, sys\n"
        f"for m in {CORE!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('disttrain.examples'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [], f"the core imports the examples: {out.stdout}"


def test_every_registry_entry_resolves_into_the_examples_package():
    for entry in [*MODELS.values(), *TASKS.values()]:
        assert entry.startswith("disttrain.examples."), entry
        assert callable(import_target(entry))


def test_the_built_in_kinds_build_from_their_sections():
    from disttrain.examples.gpt import GPT
    from disttrain.examples.mlp import MLP

    mlp = build_model(MLPConfig(hidden=[8]), 64, 10)
    assert isinstance(mlp, MLP) and mlp(torch.zeros(3, 64)).shape == (3, 10)
    gpt = build_model(GPTConfig(n_layer=2, n_head=2, d_model=16, seq_len=8), 0, 30)
    assert isinstance(gpt, GPT) and gpt(torch.zeros(2, 8, dtype=torch.int64)).shape == (2, 8, 30)
    digits = build_task(DigitsData(), seed=0)
    assert digits.name == "digits" and digits.num_classes == 10 and digits.train_x.shape[1] == 64
    lm = build_task(ShakespeareData(plays=["hamlet_gut"]), seed=0, seq_len=16)
    assert lm.is_lm and lm.units_per_sample == 16
    with pytest.raises(DisttrainError, match=r"unknown model kind 'cnn'; known: mlp, gpt"):
        build_model(MLPConfig.model_construct(kind="cnn"), 1, 1)
    with pytest.raises(DisttrainError, match=r"unknown data kind 'mnist'; known: digits, shakespeare"):
        build_task(DigitsData.model_construct(kind="mnist"), 0)


def test_the_demo_gpt_declares_its_pipeline_stages():
    from disttrain.examples.gpt import GPT

    torch.manual_seed(0)
    model = GPT(vocab_size=30, n_layer=3, n_head=2, d_model=16, seq_len=8).eval()
    plan, _ = plan_stages(model, 3, ["blocks.1", "blocks.2"])
    assert plan[1] == [("blocks.1",)] and plan[0][0] == ("tok_emb", "pos_emb", "drop")
    x = torch.randint(0, 30, (2, 8))
    want = model(x)
    stages = build_stages(model, 2, [0, 1])
    got = stages[1](stages[0](x))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
