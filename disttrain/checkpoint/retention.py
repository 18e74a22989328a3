"""Which checkpoints a run keeps: keep-K pruning that never loses the last good state, and
failed checkpoints moved aside instead of deleted or counted.

Called by rank 0 only: :func:`prune` after each commit (``writer.commit``), and
:func:`set_aside` when resuming fell back past a checkpoint that failed verification
(``Checkpointer.resume``). Only ``step_N`` directories (and our own ``.tmp-`` ones) in the
run's checkpoint directory are ever touched; a symlink there is never followed.
"""

from __future__ import annotations

import logging
import os
import shutil

from .reader import STEP_DIR, list_checkpoints

log = logging.getLogger(__name__)
CORRUPT_SUFFIX = ".corrupt"


def prune(ckpt_dir: str, keep: int, current: int, protect=(), tmp_prefix: str = ".tmp-") -> None:
    """Keep the ``keep`` newest committed checkpoints, and always ``current`` (the newest good
    one, just committed) and every step in ``protect`` (the one this run resumed from);
    remove the rest, and temporaries of steps older than ``current``."""
    found = list_checkpoints(ckpt_dir)
    kept = {step for step, _ in found[: max(keep, 1)]} | {current} | set(protect)
    for step, path in found:
        if step not in kept:
            shutil.rmtree(path, ignore_errors=True)
    for n in os.listdir(ckpt_dir):
        m = STEP_DIR.match(n.removeprefix(tmp_prefix)) if n.startswith(tmp_prefix) else None
        if m and int(m.group(1)) < current:
            shutil.rmtree(os.path.join(ckpt_dir, n), ignore_errors=True)


def set_aside(path: str) -> str | None:
    """Rename a checkpoint that failed verification to ``step_N.corrupt`` (``.corrupt.2``... when
    taken): kept for a post-mortem, no longer listed, counted or loaded. Returns the new path."""
    path = os.path.normpath(path)
    if not STEP_DIR.match(os.path.basename(path)) or os.path.islink(path) or not os.path.isdir(path):
        return None
    target, n = path + CORRUPT_SUFFIX, 1
    while os.path.lexists(target):
        n += 1
        target = f"{path}{CORRUPT_SUFFIX}.{n}"
    try:
        os.rename(path, target)
    except OSError as exc:
        log.warning("could not move the failed checkpoint %s aside: %s", path, exc)
        return None
    log.warning("moved the checkpoint that failed verification aside: %s -> %s", path, target)
    return target
