"""A SLURM test worker: ``python -m tests.cases.slurm_train CONFIG [overrides]`` (srun or sbatch).

Runs ``disttrain.worker.main`` unchanged and ends as ``python -m disttrain.worker`` does
(``disttrain.teardown.leave``: no interpreter teardown), with two test-only callbacks that run after the
real ones: ``Hold`` (on the first attempt only, after step ``DT_TEST_HOLD_STEP``, write
``held.<rank>`` in the run dir and wait until this rank's preemption handler has seen a
signal, so the test knows where the job stands when it signals it) and ``DumpParams``
(rank 0 writes every parameter to ``RUN_DIR/params.pt`` at the end).
"""

from __future__ import annotations

import os
import sys
import time

from launcher import catch_signals_early

catch_signals_early()  # first, as disttrain.worker does: SLURM's warning may come while torch imports

import torch  # noqa: E402

from disttrain import worker  # noqa: E402
from disttrain.observe import Callback  # noqa: E402
from disttrain.slurm.preemption import Preemption  # noqa: E402
from disttrain.teardown import leave  # noqa: E402


class Hold(Callback):
    def __init__(self, step: int, timeout: float = 300.0):
        self.step, self.timeout = step, timeout

    def on_step_end(self, trainer) -> None:
        if trainer.step != self.step or os.environ.get("SLURM_RESTART_COUNT", "0") not in ("", "0"):
            return
        pre = next(cb for cb in trainer.callbacks if isinstance(cb, Preemption))
        with open(os.path.join(trainer.cfg.run.dir, f"held.{trainer.comm.rank}"), "w") as f:
            f.write(str(trainer.step))
        deadline = time.monotonic() + self.timeout
        while pre.received is None and time.monotonic() < deadline:
            time.sleep(0.05)


class DumpParams(Callback):
    def on_train_end(self, trainer, summary) -> None:
        if trainer.comm.rank == 0:
            params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
            torch.save(
                {"params": params, "step": trainer.step, "restart": int(os.environ.get("SLURM_RESTART_COUNT") or 0)},
                os.path.join(trainer.cfg.run.dir, "params.pt"),
            )


def main() -> int:
    callbacks = [Hold(int(os.environ["DT_TEST_HOLD_STEP"]))] if os.environ.get("DT_TEST_HOLD_STEP") else []
    return worker.main(sys.argv[1:], callbacks=[*callbacks, DumpParams()])


if __name__ == "__main__":
    leave(main())  # as disttrain.worker ends: no interpreter teardown with gloo's threads alive
