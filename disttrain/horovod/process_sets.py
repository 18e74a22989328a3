"""Process sets: Horovod's named subsets of ranks that ops can be limited to.

    evens = hvd.ProcessSet([0, 2])
    hvd.init(process_sets=[evens])              # or later: hvd.add_process_set(evens)
    if evens.included():
        hvd.allreduce(x, process_set=evens)

Registration is collective over *all* ranks (as in Horovod with dynamic process sets), in
the same order with the same ranks everywhere: each set gets a data and a control
communicator (see ``negotiation``). ``global_process_set`` (id 0) holds every rank.
Unlike Horovod, sets may be added at any time without ``HOROVOD_DYNAMIC_PROCESS_SETS``.
"""

from __future__ import annotations

from collections.abc import Sequence

from .exceptions import HorovodError, NotInitializedError
from .negotiation import Channel


class ProcessSet:
    """A subset of global ranks. ``size``/``rank``/``included`` need it registered (init or add)."""

    def __init__(self, ranks: Sequence[int]):
        if not isinstance(ranks, (list, tuple, range)) or any(not isinstance(r, int) for r in ranks):
            raise HorovodError(
                f"ProcessSet needs a list of global ranks, got {type(ranks).__name__}\n"
                "HINT: Horovod also took an mpi4py communicator here; pass its ranks instead, "
                "e.g. ProcessSet(list(range(0, hvd.size(), 2)))"
            )
        self.ranks: list[int] = sorted(set(ranks))
        self.process_set_id: int | None = None
        self._channel: Channel | None = None
        self._my_rank: int | None = None  # this process's global rank, once registered

    def _registered(self) -> None:
        if self.process_set_id is None:
            raise NotInitializedError(
                f"{self} is not registered\nHINT: pass it to hvd.init(process_sets=[...]) "
                "or call hvd.add_process_set() on every rank"
            )

    def size(self) -> int:
        self._registered()
        return len(self.ranks)

    def rank(self) -> int:
        """This process's rank within the set, or -1 when it is not a member."""
        self._registered()
        return self.ranks.index(self._my_rank) if self._my_rank in self.ranks else -1

    def included(self) -> bool:
        self._registered()
        return self._my_rank in self.ranks

    def channel(self, op: str) -> Channel:
        self._registered()
        if self._channel is None:
            raise HorovodError(
                f"rank {self._my_rank}: {op} on {self}, which does not include this rank\n"
                "HINT: guard the call with `if process_set.included():`"
            )
        return self._channel

    def __repr__(self) -> str:
        return f"ProcessSet(process_set_id={self.process_set_id}, ranks={self.ranks})"


global_process_set = ProcessSet([])
global_process_set.process_set_id = None  # filled by hvd.init()


def register(ps: ProcessSet, set_id: int, world_channel: Channel, my_rank: int) -> None:
    """Collective over every rank: check that all ranks register the same set, then build its
    communicators (members get a Channel, the others None)."""
    if ps.process_set_id is not None:
        raise HorovodError(f"{ps} is already registered")
    size = world_channel.size
    bad = [r for r in ps.ranks if not 0 <= r < size]
    if bad or not ps.ranks:
        raise HorovodError(f"ProcessSet ranks {ps.ranks} must be a non-empty subset of range({size})")
    fp = world_channel.fingerprint("add_process_set", [], "none", f"ranks={ps.ranks}")
    world_channel.negotiate(fp)
    data = world_channel.data.new_group(ps.ranks)
    ctl = world_channel.data.new_group(ps.ranks)
    ps._my_rank = my_rank
    ps.process_set_id = set_id
    ps._channel = Channel(data, ctl, set_id, ps.ranks) if data is not None else None
