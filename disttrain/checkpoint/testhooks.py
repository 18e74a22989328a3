"""Fault injection for tests: ``DISTTRAIN_CKPT_TEST_HOOK="ACTION@STAGE:RANK[:STEP],..."``.

ACTION is ``kill`` (SIGKILL this process, like a node loss) or ``raise`` (an OSError, like
a full disk). Stages: ``step_end`` (a training step finished), ``after_shard`` (this rank's
file is written and fsynced), ``mid_manifest`` (half the manifest is on disk),
``before_rename``, ``before_latest``, ``write`` (inside the background write). Only the first
attempt of a job fires (restart count 0), so a restarted job runs clean.
"""

from __future__ import annotations

import os
import signal

ENV = "DISTTRAIN_CKPT_TEST_HOOK"


def fire(stage: str, rank: int, step: int | None = None) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    restarts = os.environ.get("DISTTRAIN_RESTART_COUNT") or os.environ.get("TORCHELASTIC_RESTART_COUNT") or "0"
    if restarts != "0":
        return
    for item in spec.split(","):
        action, _, rest = item.partition("@")
        parts = rest.split(":")
        if parts[0] != stage or int(parts[1]) != rank:
            continue
        if len(parts) > 2 and step is not None and int(parts[2]) != step:
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(f"test hook: injected failure at {stage} on rank {rank}")
