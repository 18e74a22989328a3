"""The Python API from a user's own loop (disttrain.init, setup, batches, backward, step) and
disttrain.fit, in real rank processes: 1 process equals 3 ranks with 2 micro-batches each on a
global batch of 5 ragged, padded sequences (a rank has empty micro-batches, ranks count different
numbers of tokens). Tolerance 1e-6 absolute on every parameter after 4 AdamW steps (summation order)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.support.harness import RankFailure, spawn

pytestmark = pytest.mark.timeout(900)

YAML = """
run: {{dir: {dir}, seed: 3}}
launch: {{backend: torch}}
train: {{steps: 4, batch_size: 5, grad_accum: 2, log_every: 2, eval_every: 0, eval_samples: 8}}
schedule: {{kind: constant}}
optim: {{name: AdamW, lr: 0.01, weight_decay: 0.1}}
checkpoint: {{enabled: {ckpt}}}
"""


def _config(tmp_path, name: str, ckpt: bool = False) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(YAML.format(dir=tmp_path / name, ckpt=str(ckpt).lower()))
    return str(path)


def _diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((torch.tensor(a[k]) - torch.tensor(b[k])).abs().max()) for k in a)


def test_own_loop_on_three_ranks_equals_one_process(tmp_path):
    (one,) = spawn(
        "tests.cases.user_api:train", 1, args={"config": _config(tmp_path, "one"), "overrides": [], "mode": "loop"}
    )
    assert one["global_step"] == 4 and one["steps_here"] == 4
    assert one["decays"] == [0.0, 0.1]  # biases and the LayerNorm weight: no weight decay
    three = spawn(
        "tests.cases.user_api:train", 3, args={"config": _config(tmp_path, "three"), "overrides": [], "mode": "loop"}
    )
    for r, res in enumerate(three):
        assert res["global_step"] == 4
        assert _diff(one["params"], res["params"]) <= 1e-6, f"rank {r}: {_diff(one['params'], res['params'])}"


def test_fit_with_user_parts_writes_summary_and_checkpoint(tmp_path):
    config = _config(tmp_path, "fit", ckpt=True)
    res = spawn("tests.cases.user_api:train", 2, args={"config": config, "overrides": [], "mode": "fit"})
    summary = res[0]["summary"]
    assert summary["steps"] == 4 and summary["world_size"] == 2 and summary["final_eval_loss"] > 0
    with open(os.path.join(tmp_path, "fit", "summary.json")) as f:
        assert json.load(f)["steps"] == 4
    assert os.path.isdir(os.path.join(tmp_path, "fit", "checkpoints", "step_000004"))
    metrics = os.path.join(tmp_path, "fit", "metrics.jsonl")
    with open(metrics) as f:
        before = len(f.readlines())
    # A second run of the same script resumes from the latest checkpoint and trains only step 5: the
    # training records it adds (log_every 2) are step 5's alone (from scratch: steps 2, 4 and 5).
    again = spawn(
        "tests.cases.user_api:train", 2, args={"config": config, "overrides": ["train.steps=5"], "mode": "fit"}
    )
    assert again[0]["summary"]["steps"] == 5
    with open(metrics) as f:
        added = [json.loads(line) for line in f.readlines()[before:]]
    assert [r["step"] for r in added if "loss" in r] == [5], added


def test_builtin_step_shifts_the_labels_of_a_causal_lm_as_transformers_does(tmp_path):
    """``labels = input_ids`` (transformers' convention): 2 ranks' first-step loss through the built-in
    step is the model's own ``model(input_ids, labels=...).loss`` on the same global batch (1e-5),
    not the loss of copying the input."""
    from disttrain.data.sampler import GlobalBatchSampler
    from tests.cases.user_api import Tokens, tiny_gpt2

    overrides = ["train.steps=1", "train.log_every=1", "train.eval_samples=1", "train.grad_accum=1"]
    res = spawn("tests.cases.user_api:train", 2, args={"config": _config(tmp_path, "hf"), "overrides": overrides,
                                                      "mode": "hf_fit"})  # fmt: skip
    data = Tokens()
    batch = data.ids[GlobalBatchSampler(len(data), 5, 3).global_batch(0)]
    with torch.no_grad():
        want = float(tiny_gpt2().train()(input_ids=batch, labels=batch).loss)
    got = res[0]["summary"]["final_loss"]
    assert abs(got - want) <= 1e-5, f"first-step loss {got}, transformers' own {want}"


def test_own_loop_autocasts_to_train_precision_and_refuses_a_pipeline(tmp_path):
    """train.precision=bf16: the model run.setup returns computes in bf16 in the user's own loop
    (no run.autocast() needed). parallel.mesh.pp=2: run.setup refuses with a hint, before any step."""
    res = spawn("tests.cases.user_api:train", 2, args={"config": _config(tmp_path, "bf16"),
                                                      "overrides": ["train.precision=bf16"], "mode": "loop"})  # fmt: skip
    assert all(r["logits_dtypes"] == ["torch.bfloat16"] and r["global_step"] == 4 for r in res), res[0]
    with pytest.raises(RankFailure) as err:
        spawn("tests.cases.user_api:train", 2, args={"config": _config(tmp_path, "pp"),
                                                    "overrides": ["parallel.mesh.pp=2"], "mode": "loop"})  # fmt: skip
    for out in err.value.outputs.values():
        assert "parallel.mesh.pp=2" in out and "HINT: keep pipeline parallel with the built-in loop" in out, out[-2000:]
        assert "step 1/" not in out  # refused before the first step


@pytest.mark.unit
def test_label_shift_and_split_logits_are_decided_by_model_and_step_type():
    import torch.nn as nn

    from disttrain.loss import CrossEntropyStep, SplitLogitsStep, is_causal_lm, shift_left, split_logits
    from tests.cases.user_api import Tiny, tiny_gpt2

    assert shift_left(torch.tensor([[1, 2, 3]])).tolist() == [[2, 3, -100]]
    assert is_causal_lm(tiny_gpt2()) and not is_causal_lm(Tiny()) and not is_causal_lm(nn.Linear(2, 2))
    assert CrossEntropyStep().for_model(tiny_gpt2()).shift_labels is True
    assert CrossEntropyStep().for_model(Tiny()).shift_labels is False
    assert CrossEntropyStep(shift_labels=False).for_model(tiny_gpt2()).shift_labels is False
    assert isinstance(CrossEntropyStep(), SplitLogitsStep)

    @split_logits
    def mine(model, batch):
        return model(batch), 1

    assert isinstance(mine, SplitLogitsStep) and mine.__name__ == "mine" and mine(lambda b: b + 1, 1) == (2, 1)
