"""Config errors: FILE: key.path: got X, expected Y; exit code 2; no traceback."""

import os
import subprocess
import sys

import pytest

from disttrain import config as config_mod

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(tmp_path, text):
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    return str(p)


def errors(path, overrides=()):
    with pytest.raises(config_mod.ConfigError) as info:
        config_mod.load(path, list(overrides))
    return info.value.lines


@pytest.mark.unit
def test_every_shipped_config_validates():
    for name in os.listdir(os.path.join(ROOT, "configs")):
        if name.endswith(".yaml"):
            config_mod.load(os.path.join(ROOT, "configs", name))


@pytest.mark.unit
def test_unknown_key_names_file_path_and_suggests(tmp_path):
    path = write(tmp_path, "train:\n  step: 10\n")
    (line,) = errors(path)
    assert line.startswith(f"{path}: train.step: unknown key (did you mean 'steps'?)")


@pytest.mark.unit
def test_wrong_type_and_range(tmp_path):
    path = write(tmp_path, "train:\n  steps: ten\noptim:\n  lr: -1\nmodel:\n  kind: mlp\n  hidden: [4, 0]\n")
    lines = errors(path)
    assert f"{path}: train.steps: got 'ten', expected an integer" in lines
    assert f"{path}: optim.lr: got -1, expected a value > 0.0" in lines
    assert f"{path}: model.hidden.1: got 0, expected a value > 0" in lines


@pytest.mark.unit
def test_bad_choice_and_bad_override(tmp_path):
    path = write(tmp_path, "parallel:\n  strategy: fsdp\n")
    (line,) = errors(path)
    assert "parallel.strategy: got 'fsdp', expected one of 'ddp', 'zero1', 'zero2' or 'zero3'" in line
    lines = errors(str(tmp_path / "exp.yaml"), ["parallel.strategy=ddp", "train.batch_size=0"])
    assert lines == [f"{path} (with overrides): train.batch_size: got 0, expected a value >= 1"]
    with pytest.raises(config_mod.ConfigError, match="expected key.path=value"):
        config_mod.load(path, ["train.steps"])


@pytest.mark.unit
def test_unknown_model_kind_and_bad_gpt(tmp_path):
    (line,) = errors(write(tmp_path, "model:\n  kind: resnet\n"))
    assert "model" in line and "'mlp'" in line and "'gpt'" in line
    (line,) = errors(write(tmp_path, "model:\n  kind: gpt\n  d_model: 30\n  n_head: 4\n"))
    assert "d_model (30) must be divisible by n_head (4)" in line


@pytest.mark.unit
def test_model_parallel_refuses_flags_it_cannot_honour_at_load(tmp_path):
    path = write(tmp_path, "parallel:\n  sync_batchnorm: true\n  mesh:\n    tp: 2\n")
    (line,) = errors(path)
    assert line.startswith(f"{path}: parallel: ") and "sync_batchnorm is not supported" in line
    lines = errors(path, ["parallel.sync_batchnorm=false", "parallel.activation_checkpointing=true"])
    assert any("activation_checkpointing is not supported" in x and "tp=2" in x for x in lines), lines
    config_mod.load(path, ["parallel.mesh.tp=1"])  # plain data parallel keeps both


@pytest.mark.unit
def test_bad_yaml_and_missing_file(tmp_path):
    (line,) = errors(write(tmp_path, "train: [1, 2\n"))
    assert line.startswith(str(tmp_path / "exp.yaml") + ":") and "not valid YAML" in line
    (line,) = errors(str(tmp_path / "nope.yaml"))
    assert line.endswith("nope.yaml: no such file")


def test_cli_exits_2_without_traceback(tmp_path):
    path = write(tmp_path, "train:\n  steps: -5\n")
    proc = subprocess.run(
        [sys.executable, "-m", "disttrain.cli", "run", path], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert proc.returncode == 2
    assert f"{path}: train.steps: got -5, expected a value >= 1" in proc.stderr
    assert "Traceback" not in proc.stderr
