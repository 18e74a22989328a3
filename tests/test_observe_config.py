"""The config of what a job shows: trackers, callbacks and schedulers are checked before any rank
starts, with the key path and a HINT (unit)."""

from __future__ import annotations

import importlib.util

import pytest

from disttrain import config as config_mod

pytestmark = pytest.mark.unit


def _load(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return config_mod.load(str(path), import_targets=False)


def test_a_tracker_not_installed_names_the_extra(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(config_mod.ConfigError) as info:
        _load(tmp_path, "log: {trackers: [csv, wandb]}\n")
    text = str(info.value)
    assert "log: tracker 'wandb' needs wandb" in text and "pip install 'disttrain[trackers]'" in text


def test_unknown_tracker_lists_the_known_ones(tmp_path):
    with pytest.raises(config_mod.ConfigError) as info:
        _load(tmp_path, "log: {trackers: [tensorbored]}\n")
    assert "log.trackers.0" in str(info.value) and "'tensorboard'" in str(info.value)


def test_schedule_name_is_a_torch_scheduler(tmp_path):
    cfg = _load(tmp_path, "schedule: {name: steplr, kwargs: {step_size: 2}}\n")
    assert cfg.schedule.kind == "torch"
    with pytest.raises(config_mod.ConfigError) as info:
        _load(tmp_path, "schedule: {name: CosineLR}\n")
    assert "schedule: unknown scheduler 'CosineLR'" in str(info.value) and "cosineannealinglr" in str(info.value)


def test_callbacks_take_a_builtin_name_or_a_target(tmp_path):
    cfg = _load(tmp_path, "callbacks: [{target: early_stopping, kwargs: {patience: 2}}, {target: 'my.mod:Cb'}]\n")
    assert [c.target for c in cfg.callbacks] == ["early_stopping", "my.mod:Cb"]
    with pytest.raises(config_mod.ConfigError) as info:
        _load(tmp_path, "callbacks: [{target: early_stop}]\n")
    assert "callbacks.0" in str(info.value) and "early_stopping" in str(info.value)


def test_plateau_with_warmup_is_refused_with_a_hint(tmp_path):
    with pytest.raises(config_mod.ConfigError) as info:
        _load(tmp_path, "schedule: {name: ReduceLROnPlateau, warmup_steps: 5}\n")
    assert "schedule: " in str(info.value) and "warmup_steps does not compose with ReduceLROnPlateau" in str(info.value)
    cfg = _load(tmp_path, "schedule: {name: reducelronplateau, monitor: eval_accuracy, kwargs: {mode: max}}\n")
    assert cfg.schedule.kind == "torch" and cfg.schedule.monitor == "eval_accuracy"
