"""Streaming datasets (torch IterableDataset, no __len__; tests/cases/streaming.py) through disttrain.fit:
2 ranks with 2 DataLoader workers each train steps 0-1 and checkpoint, 3 ranks resume and train steps
2-3, and the parameters equal one process's 4 steps on the same stream (1e-6, summation order):
each rank and worker read their own samples, and the resume continued at the exact sample, from the
dataset's state_dict (the stateful stream: the resumed ranks read only what follows) or by counting.
A stream without train.steps is refused with the key path on all three entry paths."""

from __future__ import annotations

import pytest
import torch

from tests.support.harness import spawn

pytestmark = pytest.mark.timeout(900)

YAML = """
run: {{dir: {dir}, seed: 3}}
launch: {{backend: torch}}
train: {{{steps}batch_size: 5, grad_accum: 2, log_every: 1, eval_every: 0, eval_samples: 6}}
schedule: {{kind: constant}}
optim: {{name: AdamW, lr: 0.01, weight_decay: 0.1}}
checkpoint: {{enabled: true, every: 2, async_save: false}}
data: {{target: "tests.cases.streaming:make"}}
model: {{target: "tests.cases.user_api:Tiny"}}
loss: {{target: "tests.cases.streaming:step"}}
"""


def _config(tmp_path, name: str, steps: int | None = 4) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(YAML.format(dir=tmp_path / name, steps=f"steps: {steps}, " if steps else ""))
    return str(path)


def _diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((torch.tensor(a[k]) - torch.tensor(b[k])).abs().max()) for k in a)


@pytest.mark.parametrize("stateful", [True, False], ids=["state_dict", "counting"])
def test_stream_splits_over_ranks_and_workers_and_resumes_at_another_world_size(tmp_path, stateful):
    (one,) = spawn("tests.cases.streaming:fit", 1, args={"config": _config(tmp_path, "one"), "overrides": [],
                                                         "stateful": stateful})  # fmt: skip
    config = _config(tmp_path, "run")
    first = spawn("tests.cases.streaming:fit", 2, args={"config": config, "stateful": stateful,
                                                        "overrides": ["train.steps=2", "data.num_workers=2"]})  # fmt: skip
    assert first[0]["summary"]["steps"] == 2
    resumed = spawn("tests.cases.streaming:fit", 3, args={"config": config, "overrides": [], "stateful": stateful})
    for rank, res in enumerate(resumed):
        assert res["summary"]["steps"] == 4
        d = _diff(one["params"], res["params"])
        assert d <= 1e-6, f"rank {rank} after a resume at 3 ranks: parameters differ from one process by {d}"
        evals = 2 * (rank + 1)  # the final evaluation reads the eval stream up to this rank's share of 6
        if stateful:  # continued from the dataset's state at sample 10: read samples 10-19 only
            assert res["reads"] == 10 + evals, f"rank {rank} read {res['reads']} samples"
        else:  # counted its way there from the start (steps 2-3 are samples 10-19; each rank's last is >= 15)
            assert res["reads"] >= 16 + evals, f"rank {rank} read {res['reads']} samples"


def test_stream_without_train_steps_is_refused_on_every_path(tmp_path):
    (out,) = spawn("tests.cases.streaming:refusals", 1, args={"yaml": _config(tmp_path, "nosteps", steps=None)})
    for path in ("yaml", "fit", "loop"):
        assert out[path].startswith("train.steps: the training dataset (Stream) has no __len__"), (path, out[path])
        assert "HINT: set train.steps" in out[path], out[path]
