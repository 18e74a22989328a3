"""Rank functions that train through the real Trainer (for equivalence tests)."""

from __future__ import annotations

import collectives
from disttrain import config as config_mod
from disttrain.session import build_trainer


def train_case(config: str, overrides: list[str], backend: str = "torch") -> dict:
    """Train with ``config`` + ``overrides``; return the loss history and every parameter."""
    cfg = config_mod.load(config, overrides + [f"launch.backend={backend}"])
    comm = collectives.init(backend, check=cfg.launch.check_collectives, timeout=120)
    trainer = build_trainer(cfg, comm)
    trainer.run_dir = None
    summary = trainer.fit()
    params = {n: p.detach().float().reshape(-1).tolist() for n, p in trainer.model.named_parameters()}
    comm.barrier()
    comm.close()
    return {"summary": summary, "losses": [h["loss"] for h in trainer.history], "params": params}
