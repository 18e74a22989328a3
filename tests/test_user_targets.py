"""Import targets, the built-in step's output reading and the optimizer section: clear errors
(``FILE: key: cannot import ...``, exit 2, no traceback) and the no-decay parameter groups."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from disttrain import config as config_mod
from disttrain.loss import StepOutputError, cross_entropy_step, read_logits
from disttrain.optim import build_optimizer_spec, user_optimizer_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

USER_MODULE = """
import torch.nn as nn

def build(width=4):
    return nn.Sequential(nn.Linear(3, width), nn.LayerNorm(width), nn.Linear(width, 2))

NOT_CALLABLE = 3
"""


def _write(tmp_path, yaml_text: str, module: str | None = USER_MODULE, name: str = "mymodels") -> str:
    if module is not None:
        (tmp_path / f"{name}.py").write_text(module)
    p = tmp_path / "run.yaml"
    p.write_text(yaml_text)
    return str(p)


def _errors(path: str) -> list[str]:
    with pytest.raises(config_mod.ConfigError) as info:
        config_mod.load(path)
    return info.value.lines


@pytest.mark.unit
def test_target_next_to_the_config_resolves(tmp_path, monkeypatch):
    monkeypatch.chdir("/")  # the config's directory is searched, not only the cwd
    path = _write(tmp_path, "model:\n  target: mymodels:build\n  kwargs: {width: 8}\ndata:\n  target: mymodels:build\n")
    cfg = config_mod.load(path)
    assert cfg.model.target == "mymodels:build" and cfg.model.kwargs == {"width": 8}
    assert str(tmp_path) in cfg.run.import_path
    # The resolved config keeps its search path: a worker loading RUN_DIR/config.yaml still finds it.
    saved = tmp_path / "elsewhere" / "config.yaml"
    config_mod.save(cfg, str(saved))
    assert config_mod.load(str(saved)).run.import_path[0] == str(tmp_path)


@pytest.mark.unit
@pytest.mark.parametrize(
    "target, why",
    [
        ("nosuchmodule:build", "(ModuleNotFoundError: No module named 'nosuchmodule')"),
        ("mymodels:biuld", "(AttributeError: module 'mymodels' has no attribute 'biuld')"),
        ("mymodels:NOT_CALLABLE", "(it is a int, not a callable)"),
    ],
)
def test_bad_model_target_names_file_key_and_reason(tmp_path, target, why):
    path = _write(tmp_path, f"model:\n  target: {target}\n")
    assert _errors(path) == [f"{path}: model.target: cannot import {target!r} {why}"]


@pytest.mark.unit
def test_broken_user_module_and_bad_spelling(tmp_path):
    path = _write(tmp_path, "model:\n  target: broken:build\n", module="def build(:\n", name="broken")
    (line,) = _errors(path)
    assert line.startswith(f"{path}: model.target: cannot import 'broken:build' (SyntaxError: ")
    path = _write(tmp_path, "loss:\n  target: mymodels.build\n")
    (line,) = _errors(path)
    assert line == f"{path}: loss.target: got 'mymodels.build', expected an import target 'package.module:attribute'"


@pytest.mark.unit
def test_every_bad_target_is_reported_at_once(tmp_path):
    path = _write(
        tmp_path,
        "model:\n  target: mymodels:build\ndata:\n  target: nope:data\n  collate: mymodels:nope\n"
        "loss:\n  target: nope2:step\n",
    )
    lines = _errors(path)
    assert [ln.split(": ")[1] for ln in lines] == ["data.collate", "data.target", "loss.target"]


@pytest.mark.unit
def test_model_section_needs_kind_or_target(tmp_path):
    (line,) = _errors(_write(tmp_path, "model:\n  kwargs: {width: 3}\n"))
    assert "model: got" in line and "'mlp', 'gpt'" in line and "target" in line
    (line,) = _errors(_write(tmp_path, "model:\n  target: mymodels:build\n  kwarg: {}\n"))
    assert "model.kwarg: unknown key (did you mean 'kwargs'?)" in line
    (line,) = _errors(_write(tmp_path, "model:\n  kind: mlp\ndata:\n  target: mymodels:build\n"))
    assert "HINT: set model.target" in line


def test_cli_bad_target_exits_2_without_traceback(tmp_path):
    path = _write(tmp_path, "model:\n  target: mymodels:biuld\n")
    proc = subprocess.run(
        [sys.executable, "-m", "disttrain.cli", "run", path], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{path}: model.target: cannot import 'mymodels:biuld' (AttributeError:" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- the built-in cross-entropy step ------------------------------------------------------------
class _Out(dict):  # shaped like transformers' ModelOutput (an OrderedDict with .logits)
    pass


@pytest.mark.unit
def test_builtin_step_reads_tensor_tuple_dict_outputs():
    torch.manual_seed(0)
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    lin = nn.Linear(3, 2)
    ref, n, metrics = cross_entropy_step(lin, (x, y))
    assert n == 5 and torch.allclose(ref, nn.functional.cross_entropy(lin(x), y, reduction="sum"))
    assert int(metrics["accuracy"]) == int((lin(x).argmax(-1) == y).sum())

    class Dict(nn.Module):
        def forward(self, input_ids):
            return _Out(logits=lin(input_ids), hidden=None)

    class Tup(nn.Module):
        def forward(self, x):
            return (lin(x), None)

    loss, n, _ = cross_entropy_step(Dict(), {"input_ids": x, "labels": y})
    assert torch.allclose(loss, ref) and n == 5
    assert torch.allclose(cross_entropy_step(Tup(), (x, y))[0], ref)
    # Padding (ignore_index) is neither in the loss nor in the count.
    y_pad = torch.tensor([0, 1, -100, 0, -100])
    loss, n, _ = cross_entropy_step(lin, (x, y_pad))
    assert int(n) == 3
    assert torch.allclose(loss, nn.functional.cross_entropy(lin(x)[[0, 1, 3]], y[[0, 1, 3]], reduction="sum"))


@pytest.mark.unit
def test_builtin_step_names_an_output_it_cannot_read():
    with pytest.raises(StepOutputError, match=r"output of type set\n.*HINT: set loss.target"):
        read_logits({1, 2})
    with pytest.raises(StepOutputError, match=r"type _Out with keys \['loss'\].*\n.*loss.target"):
        read_logits(_Out(loss=torch.zeros(())))


# -- the optimizer section ------------------------------------------------------------------------
@pytest.mark.unit
def test_optimizer_by_name_with_no_decay_groups(tmp_path):
    cfg = config_mod.load(
        _write(tmp_path, "optim:\n  name: adamw\n  weight_decay: 0.1\n  kwargs: {eps: 1.0e-6}\n", module=None)
    )
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Embedding(5, 4), nn.Linear(4, 2, bias=False))
    opt = build_optimizer_spec(cfg.optim, model).build_for(model.named_parameters())
    assert isinstance(opt, torch.optim.AdamW)
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[i] for i in decay) == ["0.weight", "2.weight", "3.weight"]
    assert all(g["eps"] == 1e-6 for g in opt.param_groups)
    # A user's factory (the Python API) gets the same groups, weight_decay 0 on the exempt one.
    spec = user_optimizer_spec(
        lambda groups: torch.optim.SGD(groups, lr=0.1, weight_decay=0.5), model, ["bias", "norm"]
    )
    opt = spec.build_for(model.named_parameters())
    assert sorted(names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.5 for p in g["params"]) == sorted(
        names[i] for i in decay
    )
    cfg.optim.no_decay = ["*.weight"]
    opt = build_optimizer_spec(cfg.optim, model).build_for(model.named_parameters())
    assert sorted(names[id(p)] for g in opt.param_groups if g["weight_decay"] for p in g["params"]) == [
        "0.bias",
        "1.bias",
    ]


@pytest.mark.unit
def test_unknown_optimizer_or_argument(tmp_path):
    (line,) = _errors(_write(tmp_path, "optim:\n  name: adamx\n", module=None))
    assert "optim: no optimizer 'adamx' in torch.optim; known:" in line and "AdamW" in line
    (line,) = _errors(_write(tmp_path, "optim:\n  name: SGD\n  betas: [0.9, 0.99]\n", module=None))
    assert "torch.optim.SGD takes no betas" in line
