"""N ranks give the same parameters as one process on the same global batch.

Tolerance: 2e-5 absolute on every parameter after 12 AdamW steps. The only difference
between layouts is the float32 summation order of the gradient (per-rank partial sums
then allreduce vs one sum), amplified slightly by Adam's normalisation.
"""

import os

import pytest

from tests.support.equivalence import assert_equivalent
from tests.support.harness import spawn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs", "digits.yaml")
ATOL = 2e-5
BASE = ["train.steps=12", "train.log_every=4", "train.eval_every=0", "schedule.warmup_steps=3"]


@pytest.fixture(scope="module")
def reference():
    return spawn("tests.cases.train:train_case", 1, args={"config": DIGITS, "overrides": BASE})[0]


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_matches_one_process(reference, world):
    results = spawn("tests.cases.train:train_case", world, args={"config": DIGITS, "overrides": BASE})
    for r in results:
        assert_equivalent(reference, r, ATOL, f"ddp on {world} ranks")


def test_grad_accum_and_uneven_batch_match(reference):
    # 64 samples over 3 ranks (21/21/22) and 2 micro-batches each: still the same global batch.
    ovr = BASE + ["train.grad_accum=2"]
    (r,) = spawn("tests.cases.train:train_case", 1, args={"config": DIGITS, "overrides": ovr})
    assert_equivalent(reference, r, ATOL, "grad_accum=2 on 1 rank")
    results = spawn("tests.cases.train:train_case", 3, args={"config": DIGITS, "overrides": ovr})
    assert_equivalent(reference, results[0], ATOL, "grad_accum=2 on 3 ranks")
