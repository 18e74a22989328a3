"""One training process: ``python -m disttrain.worker RUN_DIR/config.yaml``.

Started by ``disttrain run`` (through the launcher), or directly by torchrun, srun or
mpirun: it reads its place in the job from the environment (collectives.read_env).
The process entry only: the set-up is :class:`disttrain.session.Session`'s. No library module
imports this one, since importing it installs the early signal handlers.
"""

from __future__ import annotations

import faulthandler
import os
import sys
from collections.abc import Sequence

from launcher import catch_signals_early

catch_signals_early()  # first thing: a SLURM warning signal while torch imports must not kill set-up

# The heavy imports below come after the signal handler above, on purpose.
from collectives import CollectivesError  # noqa: E402
from launcher import LauncherError  # noqa: E402

from . import config as config_mod  # noqa: E402
from .fault import LayoutError  # noqa: E402
from .fault.inplace import InPlace  # noqa: E402
from .observe.callbacks import Callback  # noqa: E402
from .session import Session  # noqa: E402
from .targets import UserCodeError  # noqa: E402
from .teardown import leave  # noqa: E402


def main(argv: list[str] | None = None, callbacks: Sequence[Callback] = ()) -> int:
    """The process's exit code. ``callbacks`` run after the built-in ones (a custom entry module's own)."""
    argv = sys.argv[1:] if argv is None else argv
    # A native crash (an abort in a transport's thread, a segfault) prints every thread's Python
    # stack to this rank's log, next to the rank@host prefix, instead of a bare "Aborted".
    faulthandler.enable(all_threads=True)
    try:
        # A resolved config handed over by `disttrain run`/`submit` comes with its SHA-256: checked before
        # any of it is used or any target imported, and its directory (the run dir) not put on the path.
        cfg = config_mod.load(argv[0], argv[1:], sha256=os.environ.pop("DISTTRAIN_CONFIG_SHA256", None) or None)
    except config_mod.ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        session = Session.start(cfg, process=True, callbacks=callbacks)
    except LauncherError as exc:
        print(f"disttrain worker: {exc}", file=sys.stderr)
        return 2
    except LayoutError as exc:  # a lost host left a world that no configured layout fits
        print(f"disttrain worker {exc}", file=sys.stderr, flush=True)
        return 2
    where = session.comm.env.where
    try:
        while True:
            in_place = InPlace.maybe_start(cfg, session.comm)
            try:
                trainer = session.build_trainer()
                summary = trainer.fit()
                break
            except CollectivesError as exc:  # a lost host: move into the new world in this process?
                if in_place is None or not in_place.moved(exc):
                    raise
            session.close_for_rebuild()
            session = Session.start(cfg, process=True, callbacks=callbacks)
            where = session.comm.env.where
        if in_place is not None:
            in_place.stop()
    except UserCodeError as exc:  # the user's target, data or step function: the message says what to fix
        print(f"disttrain worker {where}: {exc}", file=sys.stderr, flush=True)
        return 1
    except config_mod.ConfigError as exc:  # a tp plan or pipeline split that does not fit the built model
        print(f"disttrain worker {where}: {exc}", file=sys.stderr, flush=True)
        return 2
    except LayoutError as exc:  # moved in place into a world that no configured layout fits
        print(f"disttrain worker {exc}", file=sys.stderr, flush=True)
        return 2
    return session.close(trainer, summary)


if __name__ == "__main__":
    leave(main())
