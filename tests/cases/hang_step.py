"""A step function (``loss.target``) whose rank ``hang_rank`` stops forever in its ``hang_call``-th
call, at the line marked HANG (or HANG-FS, stuck in a filesystem read; HANG-GIL, holding the GIL):
the hang watch must name that rank and this file's line."""

from __future__ import annotations

import os
import re
import time

from disttrain.loss import cross_entropy_step

CALLS = {"n": 0}


def step(model, batch, hang_rank: int = 1, hang_call: int = 3, hold_gil: bool = False, fifo: str | None = None):
    CALLS["n"] += 1
    if int(os.environ.get("RANK", "0")) == hang_rank and CALLS["n"] == hang_call:
        mark = os.environ.get("HANG_MARK")  # the benchmark's clock: when this rank stopped
        if mark:
            with open(mark, "w") as f:
                f.write(repr(time.time()))
        if fifo:  # a filesystem read that never returns: opening a FIFO nobody writes blocks in the kernel
            with open(fifo, "rb") as f:  # HANG-FS
                f.read()
        if hold_gil:  # a regular expression that never ends, holding the GIL: no Python thread runs
            re.match(r"(a+)+$", "a" * 64 + "b")  # HANG-GIL
        while True:
            time.sleep(3600)  # HANG
    return cross_entropy_step(model, batch)
