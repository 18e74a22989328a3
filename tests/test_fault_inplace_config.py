"""``fault_tolerance.recover``: the typed choice, and the fall-back to restart where in place cannot work
(a backend that cannot abort, a worker not started by our launcher), with the log line saying why."""

from __future__ import annotations

import logging
import os

import pytest

import collectives
from collectives.env import DistEnv
from disttrain import config as config_mod
from disttrain.fault.inplace import InPlace
from tests.support.harness import ROOT


class _NoAbort:  # declares what MPIBackend declares (abortable False), without starting MPI
    name, abortable, store, checks_inline, device, world_size, rank = "mpi", False, None, False, None, 2, 0


class _Abortable(_NoAbort):
    name, abortable = "torch", True

    def watch_aborts(self) -> None: ...


def _cfg(recover: str):
    return config_mod.load(os.path.join(ROOT, "configs", "digits.yaml"), [f"fault_tolerance.recover={recover}"])


@pytest.mark.unit
def test_recover_is_typed_and_restart_by_default():
    assert config_mod.load(os.path.join(ROOT, "configs", "digits.yaml")).fault_tolerance.recover == "restart"
    with pytest.raises(config_mod.ConfigError, match="fault_tolerance.recover"):
        _cfg("sometimes")


@pytest.mark.unit
def test_in_place_falls_back_to_restart_with_the_reason(caplog, monkeypatch):
    monkeypatch.delenv("DISTTRAIN_STORE", raising=False)
    env = DistEnv(0, 2, 0, 1, None, None, "single")
    assert InPlace.maybe_start(_cfg("restart"), collectives.Communicator(_Abortable(), env)) is None
    with caplog.at_level(logging.WARNING, logger="disttrain.fault.inplace"):
        assert InPlace.maybe_start(_cfg("in_place"), collectives.Communicator(_NoAbort(), env)) is None
        assert InPlace.maybe_start(_cfg("in_place"), collectives.Communicator(_Abortable(), env)) is None
    text = caplog.text
    assert "mpi backend cannot abort" in text and "restarts the workers instead" in text, text
    assert "needs disttrain's launcher" in text, text
