"""FLOPs per sample for transformers models: the formula against a hand count of GPT-2's and
Llama's weights (unit), and the TFLOPs on every metrics line of a 2-rank ``disttrain.fit`` run,
which must be that count times the samples per second per device (real ranks).

Hand count, per token of a T-token sequence: 6 N + 12 L d T, where N is every weight a matmul uses:
- GPT-2 (lm_head tied to wte): each layer ln_1 2d, c_attn 3d^2 + 3d, attn c_proj d^2 + d, ln_2 2d,
  c_fc 4d^2 + 4d, mlp c_proj 4d^2 + d = 12 d^2 + 13 d; ln_f 2d; the head V d (its weight is wte's:
  counted as the head, not as a lookup); wpe (position table) not counted.
- Llama (untied head, grouped-query attention, kv = key/value heads x head dim): each layer q and o
  d^2 each, k and v d kv each, gate/up/down 3 d I, two RMSNorms 2d; final norm d; lm_head V d;
  embed_tokens not counted.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from disttrain.observe.flops import build_flops, matmul_params, seq_len_of
from tests.cases.observe import tiny_llama
from tests.cases.user_api import VOCAB, tiny_gpt2
from tests.support.harness import spawn

SEQ = 8  # tests.cases.user_api.Tokens


def gpt2_hand(L: int, d: int, V: int, T: int) -> float:
    n = L * (12 * d * d + 13 * d) + 2 * d + V * d
    return T * (6 * n + 12 * L * d * T)


def llama_hand(L: int, d: int, kv: int, inter: int, V: int, T: int) -> float:
    n = L * (2 * d * d + 2 * d * kv + 3 * d * inter + 2 * d) + d + V * d
    return T * (6 * n + 12 * L * d * T)


GPT2_HAND = gpt2_hand(L=1, d=16, V=VOCAB, T=SEQ)
LLAMA_HAND = llama_hand(L=2, d=16, kv=2 * 4, inter=24, V=VOCAB, T=SEQ)


def _flops_of(model, batch) -> float:
    f = build_flops(None, model, None)
    f.see(batch, 4)
    return f.take()


@pytest.mark.unit
def test_gpt2_flops_per_sample_equal_the_hand_count():
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight  # tied: counted once, as the head
    assert _flops_of(model, {"input_ids": torch.zeros(4, SEQ, dtype=torch.int64)}) == GPT2_HAND


@pytest.mark.unit
def test_llama_flops_per_sample_equal_the_hand_count():
    model = tiny_llama()
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert _flops_of(model, {"input_ids": torch.zeros(4, SEQ, dtype=torch.int64)}) == LLAMA_HAND


@pytest.mark.unit
def test_window_mean_over_ragged_lengths_and_the_override_wins():
    model = tiny_gpt2()
    f = build_flops(None, model, None)
    f.see((torch.zeros(2, 4, dtype=torch.int64),), 2)  # 2 samples of 4 tokens, then 6 of 8
    f.see((torch.zeros(6, 8, dtype=torch.int64),), 6)
    want = (2 * gpt2_hand(1, 16, VOCAB, 4) + 6 * gpt2_hand(1, 16, VOCAB, 8)) / 8
    assert f.take() == pytest.approx(want, rel=1e-12)
    assert f.take() == pytest.approx(want, rel=1e-12)  # an empty window repeats the last value
    given = build_flops(None, model, 123.0)
    given.see({"input_ids": torch.zeros(2, 8)}, 2)
    assert given.take() == 123.0 and given.peak is None  # no MFU on the CPU
    assert seq_len_of({"pixel_values": torch.zeros(2, 3, 4, 4)}) == 3 and seq_len_of(torch.zeros(3)) is None
    assert not build_flops(None, torch.nn.Linear(2, 2), None).known


@pytest.mark.unit
def test_embedding_tables_are_not_matmuls():
    emb, head = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False)
    model = torch.nn.Sequential(emb, head)
    assert matmul_params(model) == 40  # the head only
    head.weight = emb.weight  # tied: the shared weight is a matmul as the head
    assert matmul_params(model) == 0 and matmul_params(model, head) == 40


YAML = """
run: {{dir: {dir}, seed: 1}}
launch: {{backend: torch, timeout: 60}}
train: {{steps: 4, batch_size: 8, log_every: 2, eval_every: 0}}
optim: {{name: AdamW, lr: 0.01}}
checkpoint: {{enabled: false}}
"""


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("kind", "hand"), [("gpt2", GPT2_HAND), ("llama", LLAMA_HAND)])
def test_every_line_carries_tflops_per_device_of_the_hand_count(tmp_path, kind, hand):
    config = tmp_path / "run.yaml"
    config.write_text(YAML.format(dir=tmp_path / "run"))
    spawn("tests.cases.observe:fit_hf", 2, args={"config": str(config), "overrides": [], "kind": kind}, timeout=240)
    with open(os.path.join(tmp_path, "run", "metrics.jsonl")) as f:
        lines = [r for r in map(json.loads, f) if "loss" in r]
    assert [r["step"] for r in lines] == [2, 4]
    for rec in lines:
        per_sample = rec["tflops_per_device"] * 1e12 / rec["samples_per_s_per_device"]
        assert per_sample == pytest.approx(hand, rel=1e-9), (rec, hand)
        assert "mfu" not in rec  # the CPU has no known peak
    # log.flops_per_sample overrides the formula.
    over = tmp_path / "over.yaml"
    over.write_text(YAML.format(dir=tmp_path / "over"))
    spawn(
        "tests.cases.observe:fit_hf",
        2,
        args={"config": str(over), "overrides": ["log.flops_per_sample=1e6"], "kind": kind},
        timeout=240,
    )
    with open(os.path.join(tmp_path, "over", "metrics.jsonl")) as f:
        rec = next(r for r in map(json.loads, f) if "loss" in r)
    assert rec["tflops_per_device"] * 1e12 / rec["samples_per_s_per_device"] == pytest.approx(1e6, rel=1e-9)
