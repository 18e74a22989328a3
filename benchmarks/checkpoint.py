"""Checkpoint save/load: ours against torch.distributed.checkpoint (DCP), same job, same run.

    python benchmarks/checkpoint.py --json bench-results/checkpoint.json [--reps 3] [--quick]

Two ranks train the GPT example (~10.7M parameters, AdamW: ~128 MiB of state) on the
Shakespeare task through our Trainer (DDP). Interleaved per repetition, best of ``--reps``,
slowest rank, a barrier before each: our sync save (xxh3 checksums on) vs ``dcp.save``; our
load incl. verification vs ``dcp.load``; the training-thread stall of our async save
(snapshot gate included) vs ``dcp.async_save``'s blocking part; the time of the training
step that overlaps a background save vs a normal step, for ours and DCP's async_save.
DCP runs on a gloo group of its own (MACHINE-NOTES: async_save on the default group hangs).

JSON ratios: ``save_vs_dcp`` = dcp/ours (>= 1.0), ``async_stall_vs_sync`` = our stall /
our sync save (<= 0.05), ``async_step_slowdown`` = overlapped step / normal step - 1
(<= 0.10; ``async_step_slowdown_cpu`` is the same from process CPU time, which a loaded
machine does not blur), ``load_vs_dcp`` = dcp/ours (>= 0.8).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks._common import print_table, spawn_job, write_json, write_result  # noqa: E402


def worker(ns) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    import collectives
    from collectives import ReduceOp
    from disttrain import config as config_mod
    from disttrain.checkpoint import Checkpointer, CheckpointReader
    from disttrain.session import build_trainer

    size = (
        ["model.n_layer=2", "model.d_model=256", "model.n_head=4"]
        if ns.quick
        else ["model.n_layer=6", "model.d_model=384", "model.n_head=6"]
    )
    cfg = config_mod.ExperimentConfig.model_validate({"model": {"kind": "gpt"}, "data": {"kind": "shakespeare"}})
    path = os.path.join(ns.dir, "cfg.yaml")
    if int(os.environ["RANK"]) == 0:
        config_mod.save(cfg, path)
    comm = collectives.init("torch", timeout=600)
    comm.barrier()
    cfg = config_mod.load(
        path,
        size
        + [
            "model.seq_len=128",
            "train.batch_size=8",
            "train.steps=100000",
            f"run.dir={ns.dir}/run",
            "checkpoint.keep=1",
        ],
    )
    trainer = build_trainer(cfg, comm)
    ours = Checkpointer(cfg.checkpoint, comm)
    trainer.callbacks = [ours]  # its before_optimizer_step waits for an async save's snapshot
    ours.attach(trainer, os.path.join(ns.dir, "ours"))
    dcp_group = dist.new_group(backend="gloo")
    rank = comm.rank

    def slowest(dt: float) -> float:
        t = torch.tensor([dt], dtype=torch.float64)
        comm.allreduce(t, ReduceOp.MAX)
        return float(t)

    cpu = {"last": 0.0}

    def timed(fn) -> float:
        """Wall seconds of ``fn`` on the slowest rank; ``cpu["last"]``: this process's CPU seconds
        (all threads, so a background save's work counts), max over ranks."""
        comm.barrier()
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        wall, used = time.perf_counter() - t0, time.process_time() - c0
        cpu["last"] = slowest(used)
        return slowest(wall)

    for _ in range(2):  # warm up; creates the optimizer state
        trainer.train_step()
    nparams = sum(p.numel() for p in trainer.model.parameters())
    state_bytes = sum(s.tensor.numel() * s.tensor.element_size() for s in trainer.strategy.state_shards())
    model, optim = trainer.strategy.model, trainer.strategy.optimizer
    dcp_dir = os.path.join(ns.dir, "dcp")

    def dcp_sd():
        msd, osd = get_state_dict(model, optim)
        return {"model": msd, "optim": osd}

    def dcp_save():
        dcp.save(dcp_sd(), checkpoint_id=dcp_dir, process_group=dcp_group)

    def dcp_load():
        sd = dcp_sd()
        dcp.load(sd, checkpoint_id=dcp_dir, process_group=dcp_group)
        set_state_dict(model, optim, model_state_dict=sd["model"], optim_state_dict=sd["optim"])

    def our_load():
        from disttrain.checkpoint import resolve

        reader = CheckpointReader(resolve(ours.dir)[0], verify=True)
        trainer.strategy.load_state_shards(reader)
        reader.release()

    res = {
        k: []
        for k in (
            "ours_save",
            "dcp_save",
            "ours_load",
            "dcp_load",
            "ours_stall",
            "dcp_stall",
            "normal_step",
            "ours_async_step",
            "dcp_async_step",
            "normal_step_cpu",
            "ours_async_step_cpu",
            "dcp_async_step_cpu",
        )
    }
    for rep in range(ns.reps):
        if rank == 0 and os.path.isdir(dcp_dir):
            shutil.rmtree(dcp_dir)
        comm.barrier()
        res["ours_save"].append(timed(lambda: ours.save(trainer, sync=True)))
        res["dcp_save"].append(timed(dcp_save))
        res["ours_load"].append(timed(our_load))
        res["dcp_load"].append(timed(dcp_load))
        # Normal steps, then one step overlapping our async save, then one overlapping DCP's.
        normal, normal_cpu = [], []
        for _ in range(3):
            normal.append(timed(trainer.train_step))
            normal_cpu.append(cpu["last"])
        res["normal_step"].append(statistics.median(normal))
        res["normal_step_cpu"].append(statistics.median(normal_cpu))
        before = ours.stall_s
        comm.barrier()
        ours.save(trainer, sync=False)  # adds its own time to stall_s
        step = timed(trainer.train_step)  # a wait at the snapshot gate also goes to stall_s
        res["ours_async_step"].append(step)
        res["ours_async_step_cpu"].append(cpu["last"])
        res["ours_stall"].append(slowest(ours.stall_s - before))
        ours.wait()
        comm.barrier()
        t0 = time.perf_counter()
        fut = dcp.async_save(dcp_sd(), checkpoint_id=dcp_dir + f"-a{rep}", process_group=dcp_group)
        res["dcp_stall"].append(slowest(time.perf_counter() - t0))
        res["dcp_async_step"].append(timed(trainer.train_step))
        res["dcp_async_step_cpu"].append(cpu["last"])
        fut.result()
        comm.barrier()
        if rank == 0:
            shutil.rmtree(dcp_dir + f"-a{rep}", ignore_errors=True)
    if rank == 0:
        write_result(
            {"params": nparams, "state_bytes_per_rank": state_bytes, "world_size": comm.world_size, "times": res}
        )
    comm.barrier()
    comm.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None, help="write results here")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="a smaller model and 2 repetitions (CI smoke)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    ns = p.parse_args()
    if ns.worker:
        worker(ns)
        return 0
    reps = ns.reps or (2 if ns.quick else 3)
    work = tempfile.mkdtemp(prefix="bench-ckpt-", dir=os.environ.get("BENCH_DIR"))
    try:
        out = spawn_job(
            [sys.executable, os.path.abspath(__file__), "--worker", "--dir", work, "--reps", str(reps)]
            + (["--quick"] if ns.quick else []),
            world=2,
            timeout=1200,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    t = {k: min(v) for k, v in out["times"].items()}
    mean = {k: statistics.fmean(v) for k, v in out["times"].items()}
    ratios = {
        "save_vs_dcp": t["dcp_save"] / t["ours_save"],
        "load_vs_dcp": t["dcp_load"] / t["ours_load"],
        "async_stall_vs_sync": t["ours_stall"] / t["ours_save"],
        "async_step_slowdown": t["ours_async_step"] / t["normal_step"] - 1,
        # CPU seconds of the overlapped step (background threads included) over a normal step's:
        # stable on a loaded machine where wall times swing by 2x, and counts the save's whole work.
        "async_step_slowdown_cpu": t["ours_async_step_cpu"] / t["normal_step_cpu"] - 1,
        "dcp_async_step_slowdown_cpu": t["dcp_async_step_cpu"] / t["normal_step_cpu"] - 1,
        "dcp_async_stall_vs_sync": t["dcp_stall"] / t["dcp_save"],
        "dcp_async_step_slowdown": t["dcp_async_step"] / t["normal_step"] - 1,
    }
    targets = {
        "save_vs_dcp": ">= 1.0",
        "load_vs_dcp": ">= 0.8",
        "async_stall_vs_sync": "<= 0.05",
        "async_step_slowdown": "<= 0.10",
    }
    mb = out["state_bytes_per_rank"] / 2**20
    rows = [[k, f"{t[k] * 1e3:.1f}", f"{mean[k] * 1e3:.1f}"] for k in out["times"]]  # *_cpu: CPU ms
    print_table(
        f"checkpoint: GPT {out['params'] / 1e6:.1f}M params, {mb:.0f} MiB state per rank, "
        f"{out['world_size']} ranks (ms, best / mean of {reps})",
        ["measure", "best ms", "mean ms"],
        rows,
    )
    print_table(
        "ratios", ["ratio", "value", "target"], [[k, f"{v:.3f}", targets.get(k, "(peer)")] for k, v in ratios.items()]
    )
    if ns.json:
        write_json(
            ns.json,
            {
                "params": out["params"],
                "state_bytes_per_rank": out["state_bytes_per_rank"],
                "world_size": out["world_size"],
                "reps": reps,
                "best_s": t,
                "mean_s": mean,
                "all_s": out["times"],
                "ratios": ratios,
                "targets": targets,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
