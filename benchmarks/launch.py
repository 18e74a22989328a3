"""Launch cost: ``disttrain launch`` against ``torchrun`` in the same run, 8 local workers.

    python benchmarks/launch.py --json results/launch.json [--reps 5] [--nproc 8]

Two rows, the same worker script under both launchers (interleaved, best of ``--reps``):

* ``trivial``: workers read their env and exit (the launcher's own cost);
* ``group``: workers run ``dist.init_process_group("gloo")`` (env://; under our launcher
  that meets at the authenticated store) and allreduce once.

JSON ``ratios.launch_vs_torchrun_trivial`` and ``ratios.launch_vs_torchrun_group`` are
torchrun_time / our_time (targets: >= 5 and >= 1.2).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TRIVIAL = "import os\nrank = int(os.environ['RANK']); world = int(os.environ['WORLD_SIZE'])\n"
GROUP = """import torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.ones(1)
dist.all_reduce(t)
assert t.item() == dist.get_world_size()
dist.destroy_process_group()
"""


def _time(argv: list[str], env: dict) -> float:
    start = time.perf_counter()
    r = subprocess.run(
        argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=300
    )
    took = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="write results here")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--nproc", type=int, default=8)
    ns = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    rows = {}
    with tempfile.TemporaryDirectory(prefix="disttrain-bench-launch-") as d:
        for name, src, reps in (("trivial", TRIVIAL, ns.reps), ("group", GROUP, max(2, ns.reps // 2))):
            script = os.path.join(d, f"{name}.py")
            with open(script, "w") as f:
                f.write(src)
            ours = [sys.executable, "-m", "launcher.cli", "--nproc-per-node", str(ns.nproc), "--redirects", "3", script]
            torchrun = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                str(ns.nproc),
                script,
            ]
            _time(ours, env)  # warm-up: page cache, .pyc files
            _time(torchrun, env)
            t_ours, t_torchrun = [], []
            for _ in range(reps):  # interleaved: load from other jobs hits both alike
                t_ours.append(_time(ours, env))
                t_torchrun.append(_time(torchrun, env))
            rows[name] = {
                "ours_s": min(t_ours),
                "torchrun_s": min(t_torchrun),
                "ours_all_s": t_ours,
                "torchrun_all_s": t_torchrun,
                "reps": reps,
            }
    ratios = {f"launch_vs_torchrun_{k}": v["torchrun_s"] / v["ours_s"] for k, v in rows.items()}
    print(
        f"{'workers':<10}{'disttrain launch':>18}{'torchrun':>12}{'ratio':>9}   ({ns.nproc} local workers, best of N)"
    )
    for k, v in rows.items():
        print(f"{k:<10}{v['ours_s']:>17.3f}s{v['torchrun_s']:>11.3f}s{ratios['launch_vs_torchrun_' + k]:>9.2f}")
    result = {
        "benchmark": "launch",
        "date": datetime.date.today().isoformat(),
        "hardware": f"{platform.node()} {os.cpu_count()} cpus",
        "nproc": ns.nproc,
        "rows": rows,
        "ratios": ratios,
        "targets": {"launch_vs_torchrun_trivial": 5.0, "launch_vs_torchrun_group": 1.2},
    }
    if ns.json:
        os.makedirs(os.path.dirname(os.path.abspath(ns.json)), exist_ok=True)
        with open(ns.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
