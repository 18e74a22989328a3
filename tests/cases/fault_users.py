"""A user's script for the host-loss tests on users' models (tests/test_fault_users.py): the same file
runs under ``disttrain launch`` as every rank of the job, and again as the survivors' new workers.

    fault_users.py own_gpt2 RUN.yaml [key=value ...]   # own loop: init / setup / batches / backward / step
    fault_users.py fit_lora RUN.yaml [key=value ...]   # disttrain.fit with a peft LoRA model

and as the import targets of a YAML run (``disttrain run``): ``model.target: tests.cases.fault_users:tiny_gpt2``,
``data.target: ...:tokens``, ``loss.target: ...:paced_lm_step``.

Both models are transformers GPT-2s built from a config (no download), tiny; ``fit_lora`` wraps it
with peft LoRA adapters on ``c_attn`` (every base weight frozen). Nothing here is about faults: the
fault tolerance is the YAML's ``fault_tolerance:`` section only. ``FAULT_USERS_STEP_SLEEP`` (seconds)
paces the steps so a test can kill a host in the middle of the run.
"""

from __future__ import annotations

import os
import sys
import time

import torch
from torch.utils.data import Dataset

import disttrain
from disttrain.loss import cross_entropy_step

VOCAB, SEQ = 64, 16


class Tokens(Dataset):
    """Seeded random token ids; ``labels`` are the ids (the step shifts them: a causal LM)."""

    def __init__(self, n: int = 512):
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(5))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2(seed: int = 0):
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg)


def lora_gpt2(seed: int = 0):
    """The tiny GPT-2 with rank-4 LoRA adapters on its attention projection (GPT-2's Conv1D: fan_in_fan_out)."""
    from peft import LoraConfig, get_peft_model

    model = tiny_gpt2(seed)
    torch.manual_seed(seed + 1)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0)
    return get_peft_model(model, cfg)


def tokens():
    return Tokens(), None


def lm_step(model, batch):
    return cross_entropy_step(model, batch, shift_labels=True)


def paced_lm_step(model, batch):
    """``lm_step`` after ``FAULT_USERS_STEP_SLEEP`` seconds (a YAML run has no callback of the user's)."""
    time.sleep(float(os.environ.get("FAULT_USERS_STEP_SLEEP", "0")))
    return lm_step(model, batch)


class Pace(disttrain.Callback):
    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_step_end(self, trainer) -> None:
        time.sleep(self.seconds)


def own_loop(config: str, overrides: list[str], pause: float) -> int:
    run = disttrain.init(config, overrides)
    model, _ = run.setup(tiny_gpt2())
    for batch in run.batches(Tokens()):
        loss_sum, count, _ = lm_step(model, batch)
        run.backward(loss_sum, count)
        if run.step() and pause:
            time.sleep(pause)
    return run.finish()


def fit_lora(config: str, overrides: list[str], pause: float) -> int:
    disttrain.fit(
        model=lora_gpt2(), data=Tokens(), step=lm_step, config=config, argv=overrides,
        callbacks=[Pace(pause)] if pause else None,
    )  # fmt: skip
    return 0


def main() -> int:
    mode, config, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    pause = float(os.environ.get("FAULT_USERS_STEP_SLEEP", "0"))
    return {"own_gpt2": own_loop, "fit_lora": fit_lora}[mode](config, overrides, pause)


if __name__ == "__main__":
    sys.exit(main())
