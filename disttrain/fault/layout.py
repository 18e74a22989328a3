"""Layouts that no longer fit: after a host is lost, the new world may be too small for
``parallel.mesh`` (tp2 on one rank) or not divisible by its tp x pp. ``fault_tolerance.fallback``
lists the layouts the job may take instead, tried in order with dp filling the rest; the state is
resharded to the first that fits as it is for a smaller dp (the checkpoint reader goes by boxes of
logical tensors, whichever layout wrote them). Without one that fits the run stops before it builds
anything, with a message naming the layout, the world size and what to set.

Who calls it: :meth:`disttrain.session.Session.start`, on every rank once the communicator is up
(every rank computes the same answer from the same config and world size; no collective).
"""

from __future__ import annotations

import logging

from ..config import ExperimentConfig
from ..errors import DisttrainError
from ..parallel.mesh import MeshError, resolve_shape

log = logging.getLogger(__name__)


class LayoutError(DisttrainError):
    """``parallel.mesh`` does not fit the world size and no ``fault_tolerance.fallback`` layout does."""


def _fits(world: int, dp, tp: int, pp: int) -> bool:
    try:
        resolve_shape(world, dp, tp, pp)
    except MeshError:
        return False
    return True


def maybe_fall_back(cfg: ExperimentConfig, world: int, where: str) -> ExperimentConfig:
    """``cfg`` when its ``parallel.mesh`` fits ``world`` ranks; else ``cfg`` with the mesh of the first
    ``fault_tolerance.fallback`` layout that fits (dp auto); else :class:`LayoutError`. Local."""
    mesh = cfg.parallel.mesh
    if _fits(world, mesh.dp, mesh.tp, mesh.pp):
        return cfg
    fallbacks = cfg.fault_tolerance.fallback
    wanted = f"parallel.mesh (dp={mesh.dp}, tp={mesh.tp}, pp={mesh.pp})"
    for i, f in enumerate(fallbacks):
        if _fits(world, "auto", f.tp, f.pp):
            new_mesh = mesh.model_copy(update={"dp": "auto", "tp": f.tp, "pp": f.pp})
            parallel = cfg.parallel.model_copy(update={"mesh": new_mesh})
            if where.startswith("0@"):
                log.warning(
                    "rank %s: %s does not fit the world of %d rank(s); falling back to fault_tolerance.fallback[%d] "
                    "(tp=%d, pp=%d, dp=%d), resharded",
                    where, wanted, world, i, f.tp, f.pp, world // (f.tp * f.pp),
                )  # fmt: skip
            return cfg.model_copy(update={"parallel": parallel})
    tried = (
        "; none of fault_tolerance.fallback fits either: " + ", ".join(f"(tp={f.tp}, pp={f.pp})" for f in fallbacks)
        if fallbacks
        else ""
    )
    raise LayoutError(
        f"rank {where}: {wanted} does not fit the world of {world} rank(s){tried}\n"
        f"HINT: set fault_tolerance.fallback to layouts the job may take with fewer ranks, in order, e.g. "
        f"[{{tp: 1, pp: 1}}]; or keep at least {mesh.tp * mesh.pp} ranks (--nnodes MIN)"
    )
