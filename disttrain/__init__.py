"""disttrain: distributed training of your own PyTorch model, from YAML or from your own script.

    run = disttrain.init("run.yaml", sys.argv[1:])
    model, opt = run.setup(model, lambda groups: torch.optim.AdamW(groups, lr=3e-4))
    for batch in run.batches(train_set):
        run.backward(*my_step(model, batch))
        run.step()

``disttrain.fit(model=..., data=..., step=..., config=...)`` runs the built-in loop instead.
``disttrain.init(train={"steps": 100})`` takes keyword settings (one mapping per section) with or
without a YAML; a config that does not validate raises ``disttrain.ConfigError``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import ConfigError, DisttrainError

__version__ = "0.1.0"
__all__ = ["BestCheckpoint", "Callback", "ConfigError", "DisttrainError", "EarlyStopping", "Run", "fit", "init"]
_OBSERVE = ("BestCheckpoint", "Callback", "EarlyStopping")

if TYPE_CHECKING:
    from .api import Run, fit, init
    from .observe import BestCheckpoint, Callback, EarlyStopping


def __getattr__(name: str):
    # The API imports torch and the collectives; `import disttrain` (the CLI, config tools) stays light.
    if name in _OBSERVE:
        from . import observe

        return getattr(observe, name)
    if name in ("Run", "fit", "init"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'disttrain' has no attribute {name!r}")
