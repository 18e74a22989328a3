"""Rank functions for the checkpoint tests: train the digits job through the real worker
(build_trainer, so the checkpoint callback resumes and saves) in a given run directory."""

from __future__ import annotations

import os

import torch

import collectives
from disttrain import config as config_mod
from disttrain.observe import Callback
from disttrain.session import build_trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIGITS = os.path.join(ROOT, "configs", "digits.yaml")


def _state(trainer) -> dict:
    out = {
        n: p.detach().reshape(-1).tolist() for n, p in trainer.model.named_parameters() if p.untyped_storage().nbytes()
    }  # ZeRO-3 frees gathered parameters between steps
    names = {p: n for n, p in trainer.model.named_parameters()}
    for p, st in trainer.strategy.optimizer.state.items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and p in names:  # ZeRO keeps state on flat masters: skipped
                out[f"optim.{names[p]}.{k}"] = v.detach().reshape(-1).tolist()
    return out


def train(run_dir: str, overrides: list[str], backend: str = "torch") -> dict:
    """Train in ``run_dir`` (resuming from its checkpoints); return step, losses and full state."""
    cfg = config_mod.load(
        DIGITS,
        [f"run.dir={run_dir}", f"launch.backend={backend}", "train.log_every=1", "train.eval_every=0", *overrides],
    )
    comm = collectives.init(backend, check=cfg.launch.check_collectives, timeout=60)
    trainer = build_trainer(cfg, comm)
    start = {"step": None}
    trainer.callbacks.append(
        type("Probe", (Callback,), {"on_train_start": lambda self, t: start.update(step=t.step)})()
    )
    summary = trainer.fit()
    ckpt = next((c for c in trainer.callbacks if type(c).__name__ == "Checkpointer"), None)
    trainer.run_dir.close()
    comm.barrier()
    comm.close()
    return {
        "step": trainer.step,
        "resumed_at": start["step"],
        "losses": [h["loss"] for h in trainer.history],
        "state": _state(trainer),
        "stall_s": ckpt.stall_s if ckpt else None,
        "summary": summary,
    }
