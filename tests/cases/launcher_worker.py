"""A worker script for launcher tests (run by the launcher, not the harness).

    python -m launcher.cli --nproc-per-node 2 tests/cases/launcher_worker.py MODE [RANK]

MODE: ok | exit3 (RANK exits 3) | kill (RANK SIGKILLs itself on the first attempt) |
raise (RANK raises) | sleep (everyone sleeps 60 s, printing its pid) | store (meet at the
launcher's store after the key ``go`` appears; every rank adds 1 to ``count``).
"""

import os
import signal
import sys
import time

rank = int(os.environ["RANK"])
attempt = os.environ.get("DISTTRAIN_RESTART_COUNT", "0")
mode = sys.argv[1] if len(sys.argv) > 1 else "ok"
target = int(sys.argv[2]) if len(sys.argv) > 2 else 1
print(
    f"rank={rank} world={os.environ['WORLD_SIZE']} local={os.environ['LOCAL_RANK']} attempt={attempt} "
    f"host={os.environ.get('DISTTRAIN_HOST')} pid={os.getpid()}",
    flush=True,
)
if mode == "exit3" and rank == target:
    print("about to fail with 3", file=sys.stderr, flush=True)
    sys.exit(3)
if mode == "kill" and rank == target and attempt == "0":
    print("killing myself", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
if mode == "raise" and rank == target:
    print("warming up", file=sys.stderr, flush=True)
    raise ValueError(f"boom on rank {rank}")
if mode == "sleep":
    time.sleep(60)
if mode == "store":
    from launcher.store import connect_from_env

    store = connect_from_env(60)
    store.get("go", 60)
    total = store.add("count", 1)
    print(f"count after me: {total}", flush=True)
# The other ranks stay alive a moment, so a failure has peers to stop.
time.sleep(0.3 if mode != "ok" else 0)
