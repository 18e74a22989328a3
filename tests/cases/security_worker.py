"""A worker for the security tests (run by the launcher, not the harness).

    python -m launcher.cli --nproc-per-node 2 tests/cases/security_worker.py MODE

MODE: restart (attempt 0: rank 1 SIGKILLs itself once the key ``go`` appears; attempt 1: every rank meets at the store,
adds 1 to ``count``, then reports whether the job secret is still in its environment and in
a child's) | sleep (print the pid, sleep 60 s).
"""

import os
import signal
import subprocess
import sys
import time

rank, attempt = int(os.environ["RANK"]), int(os.environ.get("DISTTRAIN_RESTART_COUNT", "0"))
mode = sys.argv[1]
print(f"rank={rank} attempt={attempt} pid={os.getpid()}", flush=True)
if mode == "sleep":
    time.sleep(60)
elif mode == "restart":
    from launcher.store import connect_from_env

    if attempt == 0 and rank == 1:
        connect_from_env(60).get("go", 60)  # the test says when (its strangers are all in)
        os.kill(os.getpid(), signal.SIGKILL)
    if attempt == 0:
        time.sleep(60)  # stopped by the agent once rank 1 died
    store = connect_from_env(60)
    world = int(os.environ["WORLD_SIZE"])
    store.add("count", 1)
    deadline = time.monotonic() + 60
    while int(store.add("count", 0)) < world and time.monotonic() < deadline:
        time.sleep(0.05)
    child = subprocess.run(
        [sys.executable, "-c", "import os; print('DISTTRAIN_JOB_SECRET' in os.environ)"], capture_output=True, text=True
    )
    print(
        f"MET count={store.add('count', 0)} secret_in_env={'DISTTRAIN_JOB_SECRET' in os.environ} "
        f"secret_in_child={child.stdout.strip()}",
        flush=True,
    )
