"""A worker that is slow to install its handlers (as one importing torch is): ``python -m tests.cases.early_signal
DIR``. It writes ``DIR/started.<rank>`` (the SLURM job id) first, waits for ``DIR/signalled``, then calls
``catch_signals_early`` and reports the signal it caught, if any, in ``DIR/caught.<rank>``."""

from __future__ import annotations

import os
import sys
import time

directory, rank = sys.argv[1], os.environ["RANK"]
with open(os.path.join(directory, f"started.{rank}"), "w") as f:
    f.write(os.environ.get("SLURM_JOB_ID", ""))
deadline = time.monotonic() + 60
while not os.path.exists(os.path.join(directory, "signalled")) and time.monotonic() < deadline:
    time.sleep(0.05)
time.sleep(0.5)  # the agent has passed the signal on by now: without a held signal, this process is dead

from launcher.slurm.signals import catch_signals_early, take_early_signal  # noqa: E402

assert catch_signals_early()
time.sleep(0.2)
with open(os.path.join(directory, f"caught.{rank}"), "w") as f:
    f.write(str(take_early_signal()))
