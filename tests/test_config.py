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
    names = [n for n in os.listdir(os.path.join(ROOT, "configs")) if n.endswith(".yaml")]
    assert names, "no shipped configs found"
    for name in names:
        cfg = config_mod.load(os.path.join(ROOT, "configs", name))  # raises on a bad value
        assert cfg.train.steps > 0, name


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


@pytest.mark.unit
def test_backend_typo_is_a_config_error_naming_the_key_and_the_known_names(tmp_path):
    path = write(tmp_path, "launch:\n  backend: shmm\n")
    (line,) = errors(path)
    first, hint = line.split("\n")
    assert first.startswith(f"{path}: launch.backend: unknown collectives backend 'shmm'; known backends: ")
    assert all(name in first for name in ("mpi", "nccl", "shm", "torch")), first
    assert hint.startswith("HINT: did you mean 'shm'?"), hint


@pytest.mark.unit
def test_keyword_settings_need_no_yaml_and_merge_over_one(tmp_path):
    cfg = config_mod.from_settings({"train": {"steps": 7}, "launch": {"backend": "shm"}}, ["optim.lr=0.5"])
    assert (cfg.train.steps, cfg.train.batch_size, cfg.launch.backend, cfg.optim.lr) == (7, 64, "shm", 0.5)
    path = write(tmp_path, "train:\n  steps: 3\n  batch_size: 8\n")
    cfg = config_mod.from_settings({"train": {"steps": 5}}, base=path)
    assert (cfg.train.steps, cfg.train.batch_size) == (5, 8)
    with pytest.raises(config_mod.ConfigError) as info:
        config_mod.from_settings({"train": {"steps": 0}})
    assert info.value.lines == ["<settings>: train.steps: got 0, expected a value >= 1"]


@pytest.mark.unit
def test_init_raises_a_catchable_config_error_instead_of_exiting(tmp_path):
    import disttrain

    with pytest.raises(
        disttrain.ConfigError, match=r"<settings>: launch.backend: unknown collectives backend 'tourch'"
    ):
        disttrain.init(launch={"backend": "tourch"})
    with pytest.raises(disttrain.ConfigError, match="no such file"):
        disttrain.init(str(tmp_path / "missing.yaml"))


@pytest.mark.unit
def test_cli_answers_like_argparse_tools(capsys):
    from disttrain import __version__, cli

    assert cli.main(["foo"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'foo'" in err and "usage: disttrain" in err
    with pytest.raises(SystemExit) as info:  # argparse's --version prints and exits 0
        cli.build_parser().parse_args(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"disttrain {__version__}"
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert all(verb in text for verb in ("run", "launch", "submit", "ckpt", "export", "reshard", "consolidate"))
    assert "``" not in text and ":class:" not in text, text


def test_cli_exit_codes_unknown_command_version_and_backend_typo(tmp_path):
    def cli(*args):
        cmd = [sys.executable, "-m", "disttrain.cli", *args]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=60)

    p = cli("foo")
    assert p.returncode == 2 and "invalid choice: 'foo'" in p.stderr, p.stderr
    p = cli("--version")
    assert p.returncode == 0 and p.stdout.startswith("disttrain "), p.stdout + p.stderr
    path = write(tmp_path, "launch:\n  backend: torchh\n")
    p = cli("run", path)
    assert p.returncode == 2 and f"{path}: launch.backend: unknown collectives backend 'torchh'" in p.stderr
    assert "Traceback" not in p.stderr
