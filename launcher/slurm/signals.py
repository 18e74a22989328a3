"""Signals in a SLURM job: names from the config, and a warning signal that comes too early.

SLURM sends its warning (``--signal=B:USR1@90``, forwarded by our batch script) whenever the
time limit nears (up to a minute early, SLURM's resolution), possibly while a worker still
imports torch, when the signal's default action would kill it. ``catch_signals_early()`` is the
worker's first statement; the preemption callback (``disttrain.slurm.preemption``) later takes
what it caught. Our agent (``launcher.slurm.agent``) starts workers with these signals blocked,
so one sent before even that statement waits for it; a script that never calls it keeps them
blocked and stops at SIGTERM instead.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping

from .errors import SlurmEnvError

WARNING_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)  # SLURM's time-limit warning (slurm.signal): agents pass it on
EARLY_SIGNALS = (*WARNING_SIGNALS, signal.SIGTERM)
_early: dict = {"signum": None, "old": {}}


def parse_signal(name: str) -> signal.Signals:
    """``"USR1"``, ``"SIGUSR1"`` or ``"10"`` -> the signal; SlurmEnvError naming slurm.signal otherwise."""
    raw = str(name).strip().upper()
    try:
        if raw.isdigit():
            return signal.Signals(int(raw))
        return signal.Signals[raw if raw.startswith("SIG") else "SIG" + raw]
    except (KeyError, ValueError):
        raise SlurmEnvError(f"slurm.signal: got {name!r}, expected a signal name such as USR1, USR2 or TERM") from None


def _early_handler(signum, frame) -> None:
    if _early["signum"] is None:
        _early["signum"] = signum


def catch_signals_early(env: Mapping[str, str] | None = None) -> bool:
    """First thing in a worker, inside a SLURM job only: remember a warning signal that comes
    while torch still imports (its default action would kill set-up). Main thread only.
    The preemption callback later takes it (:func:`take_early_signal`), or
    :func:`release_early_signals` restores the defaults and re-delivers it."""
    env = os.environ if env is None else env
    if not env.get("SLURM_JOB_ID") or _early["old"]:
        return False
    try:
        _early["old"] = {s: signal.signal(s, _early_handler) for s in EARLY_SIGNALS}
    except ValueError:  # not the main thread
        return False
    # Our SLURM agent starts workers with the warning signals blocked (launcher.agent's held_signals): one
    # sent before this point waited, pending, and arrives now, caught.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, EARLY_SIGNALS)
    return True


def take_early_signal() -> int | None:
    """The signal caught before the real handlers were installed (None if none); forgets it."""
    signum, _early["signum"] = _early["signum"], None
    _early["old"] = {}
    return signum


def release_early_signals() -> None:
    """No preemption handling after all: restore the handlers and re-deliver a caught signal."""
    for s, h in _early["old"].items():
        signal.signal(s, h)
    signum = take_early_signal()
    if signum is not None:
        os.kill(os.getpid(), signum)
