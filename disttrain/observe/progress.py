"""The progress line: rank 0 prints each metrics line as one line of text (a callback)."""

from __future__ import annotations

from .callbacks import Callback


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


# Fields the line shows in its own form (or leaves out); any other number is printed as "name value".
_SHOWN = {
    "step",
    "loss",
    "grad_norm",
    "lr",
    "time",
    "step_time_s",
    "data_wait_s",
    "fwd_bwd_s",
    "comm_wait_s",
    "optimizer_s",
    "eta_s",
    "mem_peak_gb",
    "tflops_per_device",
    "mfu",
    "straggler_rank",
    "straggler_lag_s",
}


def format_line(rec: dict, total: int, unit: str) -> str:
    """``[####....] step 10/100 | loss 1.2345 | grad 0.123 | lr 3.00e-03 | 1,234 samples/s | ...``"""
    key = f"{unit}s_per_s"
    if key == "tokens_per_s" and key in rec:
        speed = f"{rec[key]:,.0f} tok/s"
    elif key in rec:
        speed = f"{rec[key]:,.0f} {unit}s/s"
    else:
        speed = f"{rec['samples_per_s']:,.0f} samples/s"
    parts = [f"step {rec['step']}/{total}", f"loss {rec['loss']:.4f}", f"grad {rec['grad_norm']:.3f}"]
    parts += [f"lr {rec['lr']:.2e}", speed]
    if "step_time_s" in rec:
        parts.append(f"{rec['step_time_s'] * 1e3:.0f} ms/step (data {rec['data_wait_s'] * 1e3:.0f}")
        parts[-1] += f", comm {rec['comm_wait_s'] * 1e3:.0f}, opt {rec['optimizer_s'] * 1e3:.0f})"
    if "mfu" in rec:
        parts.append(f"{rec['tflops_per_device']:.1f} TFLOP/s/dev, MFU {rec['mfu']:.1%}")
    elif "tflops_per_device" in rec:
        parts.append(f"{rec['tflops_per_device']:.3f} TFLOP/s/dev")
    if "mem_peak_gb" in rec:
        parts.append(f"mem {rec['mem_peak_gb']:.2f} GB")
    if rec.get("straggler_rank") is not None and rec["straggler_rank"] >= 0:
        parts.append(f"slow rank {int(rec['straggler_rank'])}@{rec.get('straggler_host', '?')}")
    if "eta_s" in rec and rec["step"] < total:
        parts.append(f"ETA {_duration(rec['eta_s'])}")
    extra = [f"{k} {v:.4g}" for k, v in rec.items() if k not in _SHOWN and isinstance(v, float) and "per_s" not in k]
    bar_w = 20
    filled = int(bar_w * min(rec["step"], total) / total)
    return f"[{'#' * filled}{'.' * (bar_w - filled)}] " + " | ".join(parts + extra)


class ProgressLine(Callback):
    """Rank 0 prints ``trainer.last_record`` at each metrics line."""

    def on_step_end(self, trainer) -> None:
        rec = trainer.last_record
        if rec is None or trainer.comm.rank != 0:
            return
        unit = (trainer.data.unit if trainer.data is not None else None) or "unit"
        print(format_line(rec, trainer.cfg.train.steps, unit), flush=True)
