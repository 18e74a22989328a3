"""``fault_tolerance.fallback``: validated at load (file, key path, expected), and the layout a world
that ``parallel.mesh`` no longer fits takes (``disttrain.fault.maybe_fall_back``). The fallback under a
real host loss, resharded from peer memory, and the clear stop are in tests/test_fault_layouts.py."""

import pytest

from disttrain import config as config_mod
from disttrain.config import ExperimentConfig
from disttrain.fault import LayoutError, maybe_fall_back


def _errors(tmp_path, text: str, overrides=()) -> list[str]:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    with pytest.raises(config_mod.ConfigError) as info:
        config_mod.load(str(path), list(overrides))
    return [line.replace(str(path), "FILE") for line in info.value.lines]


@pytest.mark.unit
def test_fallback_layouts_are_checked_at_load_with_file_and_key_path(tmp_path):
    lines = _errors(tmp_path, "fault_tolerance:\n  fallback:\n    - {tp: 0}\n    - {tp: 1, dp: 2}\n")
    assert "FILE: fault_tolerance.fallback.0.tp: got 0, expected a value >= 1" in lines, lines
    assert any(x.startswith("FILE: fault_tolerance.fallback.1.dp: unknown key") for x in lines), lines
    (line,) = _errors(tmp_path, "fault_tolerance:\n  fallback: [{tp: 1}, {tp: 1, pp: 1}]\n")
    assert line.startswith("FILE: fault_tolerance: ") and "fallback[1] (tp=1, pp=1) repeats" in line, line
    (line,) = _errors(tmp_path, "parallel:\n  sync_batchnorm: true\nfault_tolerance:\n  fallback: [{pp: 2}]\n")
    assert "fault_tolerance.fallback[0] (tp=1, pp=2) is model parallel" in line and "HINT" in line, line


@pytest.mark.unit
def test_a_world_the_mesh_no_longer_fits_takes_the_first_fallback_that_does(tmp_path):
    cfg = ExperimentConfig.model_validate(
        {"parallel": {"mesh": {"tp": 2, "pp": 2}}, "fault_tolerance": {"fallback": [{"tp": 2}, {}]}}
    )
    assert maybe_fall_back(cfg, 8, "0@a") is cfg  # it fits: unchanged
    two = maybe_fall_back(cfg, 2, "0@a").parallel.mesh
    assert (two.dp, two.tp, two.pp) == ("auto", 2, 1)
    three = maybe_fall_back(cfg, 3, "0@a").parallel.mesh
    assert (three.dp, three.tp, three.pp) == ("auto", 1, 1)
    assert cfg.parallel.mesh.tp == 2 and cfg.parallel.mesh.pp == 2  # the given config is not changed


@pytest.mark.unit
def test_no_fitting_layout_stops_naming_layout_world_and_what_to_set():
    cfg = ExperimentConfig.model_validate({"parallel": {"mesh": {"tp": 2}}})
    with pytest.raises(LayoutError) as info:
        maybe_fall_back(cfg, 1, "0@hostA")
    msg = str(info.value)
    assert msg.startswith("rank 0@hostA: parallel.mesh (dp=auto, tp=2, pp=1) does not fit the world of 1 rank(s)")
    assert "HINT: set fault_tolerance.fallback" in msg and "[{tp: 1, pp: 1}]" in msg
    cfg = ExperimentConfig.model_validate(
        {"parallel": {"mesh": {"tp": 4}}, "fault_tolerance": {"fallback": [{"tp": 2}]}}
    )
    with pytest.raises(LayoutError, match=r"of 3 rank\(s\); none of fault_tolerance.fallback fits either: \(tp=2"):
        maybe_fall_back(cfg, 3, "1@hostB")
