"""Checkpoints of transformers models (tests/cases/hf_strategies.py): GPT-2 saved by 2 ranks under ZeRO-3
resumes on 3 ranks (ZeRO-3) and on 1 (ddp); ResNet's BatchNorm statistics, saved by 2 ranks under ddp
with sync BN (one async save, then a final one), come back exactly on 3 ranks (ZeRO-2) and 1 (ZeRO-3).
The 1-rank resumes run on rank 0 of the 3-rank spawn over a communicator of its own (one spawn less).
Resumed runs equal the uninterrupted single process at step 4 (tolerance as tests/test_data_parallel_hf.py).
``disttrain ckpt consolidate`` and ``export`` give files that plain transformers loads (strict, and
``from_pretrained``) with the saving run's eval loss (1e-6: the same weights, one process); ``export``
into a non-empty directory is refused unless ``--force``, which keeps everything it did not write.
"""

import os

import pytest
import torch

from disttrain.checkpoint.cli import main as ckpt
from tests.cases import hf_strategies as H
from tests.test_data_parallel_hf import _max_diff, check_against_reference

pytestmark = pytest.mark.timeout(1800)


@pytest.mark.parametrize("world", [1, 3])
@pytest.mark.parametrize("model", ["gpt2", "resnet"])
def test_checkpoint_from_two_ranks_resumes_on_other_world_sizes(world, model):
    res = H.results()
    saved = res[2][0][f"{model}/{'zero3' if model == 'gpt2' else 'ddp'}/save"]
    per_rank = [r[f"{model}/resume"] for r in res[3]] if world == 3 else [res[3][0][f"{model}/resume@1"]]
    for rank, got in enumerate(per_rank):
        assert got["resumed_from"] == H.SAVE_AT, f"{model} at {world} ranks did not resume"
        # The loaded state is the saved state, bit for bit: parameters (gathered whole) and buffers.
        assert _max_diff(saved["params"], got["after_load"]["params"]) == 0.0
        assert _max_diff(saved["buffers"], got["after_load"]["buffers"]) == 0.0
        want = res["ref"][model]
        got = {**got, "losses": want["losses"][: H.SAVE_AT] + got["losses"]}  # steps before the save ran elsewhere
        check_against_reference(got, want, f"{model} resumed at {world} ranks, rank {rank}")


def _step_dir(model: str) -> str:
    return os.path.join(H.results()["dirs"][model], "checkpoints", f"step_{H.SAVE_AT:06d}")


@pytest.mark.parametrize("model", ["gpt2", "resnet"])
def test_consolidated_file_loads_strictly_into_the_plain_model(model, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "model.safetensors"
    assert ckpt(["consolidate", _step_dir(model), str(out)]) == 0
    plain = H.build_model(model, seed=7)
    sd = load_file(str(out))
    assert set(sd) == set(plain.state_dict()), sorted(set(sd) ^ set(plain.state_dict()))
    plain.load_state_dict(sd, strict=True)
    if model == "gpt2":
        assert torch.equal(sd["lm_head.weight"], sd["transformer.wte.weight"])  # the tied name, consolidated too
    else:
        assert any(k.endswith("running_var") for k in sd) and any(k.endswith("num_batches_tracked") for k in sd)
    saved = H.results()[2][0][f"{model}/{'zero3' if model == 'gpt2' else 'ddp'}/save"]
    assert abs(H.eval_loss(model, plain) - saved["eval"]) <= 1e-6


@pytest.mark.parametrize("model", ["gpt2", "resnet"])
def test_export_loads_with_from_pretrained(model, tmp_path):
    import transformers

    out = tmp_path / "export"
    assert ckpt(["export", _step_dir(model), str(out)]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    auto = transformers.AutoModelForCausalLM if model == "gpt2" else transformers.AutoModelForImageClassification
    loaded = auto.from_pretrained(str(out))
    assert type(loaded) is type(H.build_model(model))
    if model == "gpt2":
        assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    saved = H.results()[2][0][f"{model}/{'zero3' if model == 'gpt2' else 'ddp'}/save"]
    assert abs(H.eval_loss(model, loaded) - saved["eval"]) <= 1e-6
    assert _max_diff(saved["buffers"], H.state_of(loaded)["buffers"]) == 0.0


def test_export_refuses_a_non_empty_directory_and_never_deletes_what_it_did_not_create(tmp_path, capsys):
    """Exporting into `.` or an existing model folder must not wipe it: refused without --force; with it,
    only config.json and model.safetensors are written and every other entry is kept."""
    out = tmp_path / "mine"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("keep me")
    (out / "sub" / "data.bin").write_bytes(b"\0" * 8)
    assert ckpt(["export", _step_dir("gpt2"), str(out)]) == 1
    assert "not empty" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["notes.txt", "sub"]
    assert ckpt(["export", _step_dir("gpt2"), str(out), "--force"]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "notes.txt", "sub"]
    assert (out / "notes.txt").read_text() == "keep me" and (out / "sub" / "data.bin").read_bytes() == b"\0" * 8
    assert not [p for p in os.listdir(tmp_path) if p != "mine"]  # no temporary left behind
    empty = tmp_path / "empty"
    empty.mkdir()
    assert ckpt(["export", _step_dir("gpt2"), str(empty)]) == 0  # an empty directory needs no --force
    assert sorted(os.listdir(empty)) == ["config.json", "model.safetensors"]


def test_reshard_check_answers_for_buffers_and_transformers_layouts(capsys):
    """BatchNorm statistics have no optimizer state and still load; a transformers GPT-2 (2 heads,
    2 blocks under transformer.h) can take tp=2 and pp=2, not tp=4 nor pp=3."""
    res, gpt = _step_dir("resnet"), _step_dir("gpt2")
    for path, to, want in ((res, "zero2:3", 0), (gpt, "ddp:4,tp=2", 0), (gpt, "ddp:4,pp=2", 0),
                           (gpt, "ddp:4,tp=4", 1), (gpt, "ddp:3,pp=3", 1)):  # fmt: skip
        got = ckpt(["reshard", path, "--check", "--to", to])
        assert got == want, f"{os.path.basename(os.path.dirname(os.path.dirname(path)))} -> {to}: " + (
            capsys.readouterr().out
        )


@pytest.mark.unit
def test_model_record_is_json_with_the_transformers_config_only_for_transformers_models():
    import json

    import torch.nn as nn

    from disttrain.checkpoint.state import model_record

    rec = model_record(H.build_model("gpt2"))
    assert rec["aliases"] == {"lm_head.weight": "transformer.wte.weight"}
    cfg = rec["transformers"]["config"]
    assert cfg["architectures"] == ["GPT2LMHeadModel"] and cfg["n_embd"] == 32 and cfg["model_type"] == "gpt2"
    assert json.loads(json.dumps(rec)) == rec  # plain JSON, no pickle
    plain = model_record(nn.Sequential(nn.Linear(2, 2)))
    assert "transformers" not in plain and plain["class"] == "torch.nn.modules.container.Sequential"
