"""A named device mesh: the world's ranks laid out on axes ``pp x dp x tp`` (tp fastest).

``rank = (pp_index * dp + dp_index) * tp + tp_index``: tensor-parallel peers are
neighbouring ranks (on one host when ranks are packed per host, where their per-layer
allreduces are cheapest), pipeline stages are the outermost blocks.

    mesh = build_mesh(comm, dp="auto", tp=2, pp=1)   # every rank, collectively, once
    mesh.group("tp")      # this rank's tensor-parallel Communicator (None when tp == 1)
    mesh.index("dp")      # this rank's coordinate on the dp axis

Each axis's sub-groups are created once, here, by every rank in the same order (some
backends need every rank of the parent to take part in creating every group).
"""

from __future__ import annotations

import dataclasses
import logging

from collectives import Communicator

from ..errors import DisttrainError

log = logging.getLogger(__name__)

AXES = ("pp", "dp", "tp")  # outermost first


class MeshError(DisttrainError):
    """A mesh layout that does not fit the world size or the model."""


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """The spec: degrees per axis (no communicators)."""

    dp: int
    tp: int
    pp: int

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    def coords(self, rank: int) -> dict[str, int]:
        tp_i = rank % self.tp
        dp_i = (rank // self.tp) % self.dp
        pp_i = rank // (self.tp * self.dp)
        return {"pp": pp_i, "dp": dp_i, "tp": tp_i}

    def rank_of(self, pp: int, dp: int, tp: int) -> int:
        return (pp * self.dp + dp) * self.tp + tp

    def axis_groups(self, axis: str) -> list[list[int]]:
        """Every group of ``axis`` (ranks that differ only in that coordinate), in a fixed order."""
        sizes = {"pp": self.pp, "dp": self.dp, "tp": self.tp}
        others = [a for a in AXES if a != axis]
        groups = []
        for i in range(sizes[others[0]]):
            for j in range(sizes[others[1]]):
                fixed = {others[0]: i, others[1]: j}
                groups.append([self.rank_of(**{**fixed, axis: k}) for k in range(sizes[axis])])
        return groups

    def __str__(self) -> str:
        return f"dp{self.dp} x tp{self.tp} x pp{self.pp}"


def resolve_shape(world_size: int, dp: int | str = "auto", tp: int = 1, pp: int = 1) -> MeshShape:
    """Check the degrees against the world size; ``dp='auto'`` takes what tp*pp leaves. Local."""
    for name, v in (("tp", tp), ("pp", pp)):
        if not isinstance(v, int) or v < 1:
            raise MeshError(f"parallel.mesh.{name}={v!r}: expected an integer >= 1")
    if dp == "auto":
        if world_size % (tp * pp):
            raise MeshError(
                f"parallel.mesh: tp ({tp}) x pp ({pp}) = {tp * pp} does not divide the world size ({world_size}), "
                f"so dp='auto' has no integer value\nHINT: pick tp and pp whose product divides {world_size}, "
                f"or change the number of processes"
            )
        dp = world_size // (tp * pp)
    if not isinstance(dp, int) or dp < 1:
        raise MeshError(f"parallel.mesh.dp={dp!r}: expected an integer >= 1 or 'auto'")
    if dp * tp * pp != world_size:
        raise MeshError(
            f"parallel.mesh: dp ({dp}) x tp ({tp}) x pp ({pp}) = {dp * tp * pp}, but the world size is {world_size}\n"
            f"HINT: the degrees must multiply to the number of processes; set dp: auto to let it fill in "
            f"{world_size}/(tp*pp)"
        )
    return MeshShape(dp, tp, pp)


class DeviceMesh:
    """The live mesh: this rank's coordinates and one Communicator per axis of size > 1."""

    def __init__(self, comm: Communicator, shape: MeshShape):
        if shape.world_size != comm.world_size:
            raise MeshError(
                f"rank {comm.env.where}: mesh {shape} has {shape.world_size} ranks, the world has "
                f"{comm.world_size}\nHINT: build it with resolve_shape(world_size, ...)"
            )
        self.comm, self.shape = comm, shape
        self._coords = shape.coords(comm.rank)
        self._groups: dict[str, Communicator | None] = {}
        self._members: dict[str, list[int]] = {}
        for axis in AXES:  # same order on every rank: new_group is collective over the world
            size = getattr(shape, axis)
            for ranks in shape.axis_groups(axis):
                if comm.rank in ranks:
                    self._members[axis] = ranks
                if size == 1:
                    continue
                g = comm.new_group(ranks)
                if comm.rank in ranks:
                    self._groups[axis] = g
            self._groups.setdefault(axis, None)
        log.debug("rank %s: mesh %s, coords %s", comm.env.where, shape, self._coords)

    def size(self, axis: str) -> int:
        return getattr(self.shape, self._check(axis))

    def index(self, axis: str) -> int:
        """This rank's coordinate on ``axis`` (= its rank inside ``group(axis)``)."""
        return self._coords[self._check(axis)]

    def group(self, axis: str) -> Communicator | None:
        """This rank's Communicator along ``axis``; None when the axis has size 1."""
        return self._groups[self._check(axis)]

    def ranks(self, axis: str) -> list[int]:
        """World ranks of this rank's group along ``axis``, in group-rank order."""
        return list(self._members[self._check(axis)])

    def _check(self, axis: str) -> str:
        if axis not in AXES:
            raise MeshError(f"unknown mesh axis {axis!r}; the axes are {', '.join(AXES)}")
        return axis

    def __repr__(self) -> str:
        return f"DeviceMesh({self.shape}, rank {self.comm.rank} at {self._coords})"


def build_mesh(comm: Communicator, dp: int | str = "auto", tp: int = 1, pp: int = 1) -> DeviceMesh:
    """Every rank, collectively and once: check the layout and create the axis groups. Blocks."""
    return DeviceMesh(comm, resolve_shape(comm.world_size, dp, tp, pp))
