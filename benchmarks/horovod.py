"""disttrain.horovod next to real Horovod (gloo), in the same processes, interleaved.

    .venv/bin/python benchmarks/horovod.py                 # 2 ranks; table + JSON on stdout
    .venv/bin/python benchmarks/horovod.py --np 2 --reps 7 --json out.json

When Horovod is installed (scripts/build_horovod.sh), the workers are started by
``horovodrun --gloo`` and each worker also initialises ``disttrain.horovod`` (backend from
DISTTRAIN_HVD_BACKEND, default shm), so both run on the same ranks, alternating.
Without Horovod, only our rows are measured. Each cell: warm-up, barrier, best of --reps
(and the mean), for ``hvd.allreduce(t)`` (out of place, Average: Horovod's default) and
``hvd.allreduce_(t)`` (in place) at 4 KiB, 1 MiB and 64 MiB, and for one training step
(zero_grad, forward, backward, ``DistributedOptimizer.step()``) of an MLP with 120 parameter
tensors and of a transformers GPT-2 (52 tensors of mixed sizes), beside the same step with a
plain optimizer (``compute``: what the step costs without any communication); the three step
rows take their repetitions in turns. Ratios: Horovod's best time over ours,
``hvd_api_vs_horovod_allreduce_64MiB`` (target >= 3) and ``hvd_step_vs_horovod`` (target >= 2),
and ours over compute, ``hvd_step_over_compute`` (target <= 1.3); ``_gpt2`` for the GPT-2 step.
Both libraries live in the same processes, so each one's background thread also runs while the
other is measured. ``--parts mlp,gpt2`` skips the allreduce rows.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import secrets
import shutil
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Run as a script, this folder comes first on sys.path, where collectives.py and this very
# file would shadow the ``collectives`` and ``horovod`` packages: put the repository there instead.
sys.path[:] = [ROOT] + [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
SIZES = {"4KiB": 4 << 10, "1MiB": 1 << 20, "64MiB": 64 << 20}
LAYERS, WIDTH, BATCH = 60, 128, 16  # 120 parameter tensors, 1 M parameters (4 MiB of gradients)
# GPT-2 (transformers, built from its config): 52 parameter tensors from 256 B to 4 MiB, 2.4 M parameters
GPT2 = {"n_layer": 4, "n_embd": 192, "n_head": 4, "vocab_size": 4096, "n_positions": 64}
GPT2_BATCH = 4
PARTS = ("allreduce", "mlp", "gpt2")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _time(fn, barrier, reps: int) -> tuple[float, float]:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        barrier()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times), sum(times) / len(times)


def worker(reps: int, out_path: str, parts: tuple[str, ...] = PARTS) -> None:
    import torch

    torch.set_num_threads(1)
    if "HOROVOD_RANK" in os.environ:  # started by horovodrun: tell our side where it is
        os.environ.update(
            RANK=os.environ["HOROVOD_RANK"],
            WORLD_SIZE=os.environ["HOROVOD_SIZE"],
            LOCAL_RANK=os.environ["HOROVOD_LOCAL_RANK"],
            LOCAL_WORLD_SIZE=os.environ["HOROVOD_LOCAL_SIZE"],
        )
    import disttrain.horovod as ours

    ours.init()
    peer = None
    if "HOROVOD_RANK" in os.environ:
        import horovod.torch as peer

        peer.init()
    rows = []
    for label, nbytes in SIZES.items() if "allreduce" in parts else ():
        n = nbytes // 4
        for impl_name, impl in [("disttrain.horovod", ours), ("horovod", peer)]:
            if impl is None:
                continue
            t = torch.ones(n)
            barrier = impl.barrier if impl is ours else (lambda: peer.allreduce(torch.zeros(1), name="bench.b"))
            k = max(2, reps if nbytes >= 1 << 20 else reps * 10)
            best, mean = _time(lambda impl=impl, t=t, label=label: impl.allreduce(t, name=f"b.{label}"), barrier, k)
            best_i, mean_i = _time(
                lambda impl=impl, t=t, label=label: impl.allreduce_(t, name=f"bi.{label}"), barrier, k
            )
            rows.append(
                {
                    "impl": impl_name,
                    "size": label,
                    "bytes": nbytes,
                    "allreduce_s": best,
                    "allreduce_mean_s": mean,
                    "allreduce_inplace_s": best_i,
                    "allreduce_inplace_mean_s": mean_i,
                }
            )
    for model in ("mlp", "gpt2"):
        if model not in parts:
            continue
        impls = [("compute", None), ("disttrain.horovod", ours), ("horovod", peer)]
        steps = {name: _step_fn(model, impl, torch) for name, impl in impls if name == "compute" or impl is not None}
        barrier = ours.barrier
        times: dict[str, list[float]] = {name: [] for name in steps}
        for step in steps.values():  # warm-up (and the first, negotiated, step)
            step()
            step()
        for _ in range(max(3, reps * 2)):  # in turns, so drifts of the machine hit every row alike
            for name, step in steps.items():
                barrier()
                t0 = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t0)
        for name, ts in times.items():
            rows.append(
                {"impl": name, "size": f"step_{model}", "bytes": 0, "step_s": min(ts), "step_mean_s": sum(ts) / len(ts)}
            )
    if ours.rank() == 0:
        with open(out_path, "w") as f:
            json.dump({"rows": rows, "backend": ours.basics.context().backend, "np": ours.size()}, f)
    ours.shutdown()
    if peer is not None:
        peer.shutdown()


def _step_fn(model_kind: str, impl, torch):
    """One training step (zero_grad, forward, backward, step) of the same model on the same data for
    every impl: ``DistributedOptimizer.step()`` for a Horovod, a plain optimizer for ``compute`` (impl None)."""
    torch.manual_seed(0)
    if model_kind == "mlp":
        layers = []
        for _ in range(LAYERS):
            layers += [torch.nn.Linear(WIDTH, WIDTH), torch.nn.Tanh()]
        model = torch.nn.Sequential(*layers)
        x = torch.randn(BATCH, WIDTH)

        def loss():
            return model(x).pow(2).mean()
    else:
        import transformers

        transformers.logging.set_verbosity_error()
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2, bos_token_id=0, eos_token_id=0))
        ids = torch.randint(0, GPT2["vocab_size"], (GPT2_BATCH, GPT2["n_positions"]))

        def loss():
            return model(input_ids=ids, labels=ids).loss

    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    if impl is not None:
        opt = impl.DistributedOptimizer(opt, named_parameters=model.named_parameters())
        impl.broadcast_parameters(model.state_dict(), root_rank=0)

    def step():
        opt.zero_grad()
        loss().backward()
        opt.step()

    return step


def _run_ours(np_: int, reps: int, out_path: str, parts: str) -> None:
    port, job = _free_port(), "hvdbench-" + secrets.token_hex(3)
    procs = []
    for r in range(np_):
        env = dict(
            os.environ,
            RANK=str(r),
            WORLD_SIZE=str(np_),
            LOCAL_RANK=str(r),
            LOCAL_WORLD_SIZE=str(np_),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            DISTTRAIN_JOB_ID=job,
            OMP_NUM_THREADS="1",
            PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, "--worker", "--reps", str(reps), "--out", out_path, "--parts", parts],
                env=env,
                cwd=ROOT,
            )
        )
    try:
        for p in procs:
            p.wait(timeout=600)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(p.returncode for p in procs):
        raise SystemExit(f"benchmark workers failed: exit codes {[p.returncode for p in procs]}")


def _run_with_horovod(np_: int, reps: int, out_path: str, parts: str) -> None:
    horovodrun = shutil.which("horovodrun") or os.path.join(os.path.dirname(sys.executable), "horovodrun")
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        OMP_NUM_THREADS="1",
        DISTTRAIN_JOB_ID="hvdbench-" + secrets.token_hex(3),
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    cmd = [
        horovodrun,
        "-np",
        str(np_),
        "-H",
        f"localhost:{np_}",
        "--gloo",
        sys.executable,
        __file__,
        "--worker",
        "--reps",
        str(reps),
        "--out",
        out_path,
        "--parts",
        parts,
    ]
    subprocess.run(cmd, env=env, cwd=ROOT, check=True, timeout=900)


TARGETS = {
    "hvd_step_vs_horovod": (">=", 2.0),
    "hvd_api_vs_horovod_allreduce_64MiB": (">=", 3.0),
    "hvd_step_over_compute": ("<=", 1.3),
}


def _met(value: float, goal: tuple[str, float]) -> bool:
    return value >= goal[1] if goal[0] == ">=" else value <= goal[1]


def horovod_installed() -> bool:
    try:
        import horovod.torch  # noqa: F401
    except Exception:
        return False
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--np", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", default=None, help="also write the JSON here")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.worker:
        worker(ns.reps, ns.out, tuple(ns.parts.split(",")))
        return 0
    out_path = os.path.join("/tmp", f"hvdbench-{os.getpid()}.json")
    with_peer = horovod_installed()
    (_run_with_horovod if with_peer else _run_ours)(ns.np, ns.reps, out_path, ns.parts)
    with open(out_path) as f:
        res = json.load(f)
    os.unlink(out_path)
    rows = res["rows"]
    print(
        f"allreduce, {res['np']} ranks, disttrain.horovod over {res['backend']}"
        f"{' vs horovod 0.28.1 (gloo)' if with_peer else ' (horovod not installed)'}; best of {ns.reps}, ms"
    )
    print(f"{'impl':<20}{'size':>10}{'allreduce':>9}{'(mean)':>10}{'allreduce_':>12}{'(mean)':>10}")
    for r in rows:
        if r["size"].startswith("step"):
            print(f"{r['impl']:<20}{r['size']:>10}{r['step_s'] * 1e3:>9.3f}{r['step_mean_s'] * 1e3:>10.3f}")
            continue
        print(
            f"{r['impl']:<20}{r['size']:>10}{r['allreduce_s'] * 1e3:>9.3f}{r['allreduce_mean_s'] * 1e3:>10.3f}"
            f"{r['allreduce_inplace_s'] * 1e3:>12.3f}{r['allreduce_inplace_mean_s'] * 1e3:>10.3f}"
        )
    ratios = {}
    for size in SIZES:
        a = next((r for r in rows if r["impl"] == "disttrain.horovod" and r["size"] == size), None)
        b = next((r for r in rows if r["impl"] == "horovod" and r["size"] == size), None)
        if a and b:
            ratios[f"hvd_api_vs_horovod_allreduce_{size}"] = b["allreduce_s"] / a["allreduce_s"]
            ratios[f"hvd_api_vs_horovod_allreduce_inplace_{size}"] = b["allreduce_inplace_s"] / a["allreduce_inplace_s"]
    for model in ("mlp", "gpt2"):
        got = {r["impl"]: r["step_s"] for r in rows if r["size"] == f"step_{model}"}
        suffix = "" if model == "mlp" else f"_{model}"
        if "horovod" in got and "disttrain.horovod" in got:
            ratios[f"hvd_step_vs_horovod{suffix}"] = got["horovod"] / got["disttrain.horovod"]
        if "compute" in got and "disttrain.horovod" in got:
            ratios[f"hvd_step_over_compute{suffix}"] = got["disttrain.horovod"] / got["compute"]
        if "compute" in got and "horovod" in got:
            ratios[f"horovod_step_over_compute{suffix}"] = got["horovod"] / got["compute"]
    for k, v in ratios.items():
        goal = TARGETS.get(k)
        print(
            f"{k:<44}{v:>8.3f}"
            + (f"   goal {goal[0]} {goal[1]}: {'met' if _met(v, goal) else 'MISSED'}" if goal else "")
        )
    doc = {
        "benchmark": "horovod",
        "date": datetime.date.today().isoformat(),
        "host": platform.node(),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "np": res["np"],
        "loadavg": os.getloadavg(),
        "backend": res["backend"],
        "horovod": with_peer,
        "rows": rows,
        "ratios": ratios,
        "targets": {
            k: {"goal": f"{c} {g}", "met": _met(ratios[k], (c, g))} for k, (c, g) in TARGETS.items() if k in ratios
        },
    }
    print(json.dumps(doc, indent=1))
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
