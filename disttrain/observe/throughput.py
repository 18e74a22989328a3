"""Throughput and cost of a run: the step time split, speed per device, peak memory, ETA, FLOPs, MFU.

The trainer times four sections of each step on every rank (:class:`StepClock`): waiting for
data, the optimizer (clip, schedule, step), communication it waits for (the gradient reduction
and the step's count allreduce) and the rest, which is forward and backward (in the user's own
loop: everything between two batches). At each metrics line :func:`window_stats` gathers every
rank's section times and peak memory (one allgather) and :func:`cost_fields` turns them into
the line's fields; TFLOPs per device and MFU come from the FLOPs per sample of
:mod:`disttrain.observe.flops`.
"""

from __future__ import annotations

import resource
import time

import torch

from collectives import Communicator

SECTIONS = ("data_wait", "fwd_bwd", "comm_wait", "optimizer")


def _peak_rss() -> float:
    """This process image's peak resident bytes: VmHWM where /proc has it (ru_maxrss survives fork and
    exec on Linux, so a worker would report its launcher's size when that was larger)."""
    try:
        with open("/proc/self/status") as f:
            return next(float(x.split()[1]) * 1024.0 for x in f if x.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # kilobytes on Linux


def peak_memory_bytes(device: str) -> tuple[float, float]:
    """(peak RSS of this process, peak CUDA memory allocated on ``device`` or 0)."""
    rss = _peak_rss()
    cuda = 0.0
    if str(device).startswith("cuda") and torch.cuda.is_available():
        cuda = float(torch.cuda.max_memory_allocated(torch.device(device)))
    return rss, cuda


class StepClock:
    """This rank's seconds per section over the log window (``start``/``stop`` pairs, no sync)."""

    def __init__(self) -> None:
        self.sums = dict.fromkeys(SECTIONS, 0.0)
        self._t0 = 0.0
        self.step_start = time.perf_counter()
        self.window_start = self.step_start

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self, section: str) -> None:
        self.sums[section] += time.perf_counter() - self._t0

    def add(self, section: str, seconds: float) -> None:
        self.sums[section] += seconds

    def reset(self) -> None:
        self.sums = dict.fromkeys(SECTIONS, 0.0)
        self.window_start = time.perf_counter()


def window_stats(comm: Communicator, clock: StepClock, device: str, elapsed: float) -> list[list[float]]:
    """Every rank's [data_wait, comm_wait, optimizer, elapsed, rss, cuda] for the window. Collective."""
    rss, cuda = peak_memory_bytes(device)
    s = clock.sums
    mine = torch.tensor([s["data_wait"], s["comm_wait"], s["optimizer"], elapsed, rss, cuda], dtype=torch.float64)
    rows = [torch.zeros_like(mine) for _ in range(comm.world_size)]
    comm.allgather(rows, mine)
    return [r.tolist() for r in rows]


def cost_fields(
    rows: list[list[float]],
    steps: int,
    samples: float,
    units: float,
    unit: str,
    devices: int,
    remaining_steps: int,
    flops_per_sample: float | None,
    peak: float | None,
) -> dict:
    """The throughput fields of a metrics line from :func:`window_stats` rows (rank order)."""
    steps = max(steps, 1)
    elapsed = max(max(r[3] for r in rows), 1e-9)
    step_s = elapsed / steps
    n = len(rows)
    data = sum(r[0] for r in rows) / n / steps
    comm = sum(r[1] for r in rows) / n / steps
    opt = sum(r[2] for r in rows) / n / steps
    out = {
        "step_time_s": step_s,
        "data_wait_s": data,
        "fwd_bwd_s": max(step_s - data - comm - opt, 0.0),
        "comm_wait_s": comm,
        "optimizer_s": opt,
        "samples_per_s": samples / elapsed,
        "samples_per_s_per_device": samples / elapsed / devices,
        "eta_s": remaining_steps * step_s,
        "mem_peak_gb": max(max(r[4], r[5]) for r in rows) / 1e9,
        "mem_peak_gb_per_rank": [round((r[5] or r[4]) / 1e9, 4) for r in rows],
    }
    if unit != "sample" and units != samples:
        out[f"{unit}s_per_s"] = units / elapsed
        out[f"{unit}s_per_s_per_device"] = units / elapsed / devices
    if flops_per_sample:
        tflops = flops_per_sample * samples / elapsed / devices / 1e12
        out["tflops_per_device"] = tflops
        if peak:
            out["mfu"] = tflops * 1e12 / peak
    return out
