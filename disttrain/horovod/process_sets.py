"""Process sets: Horovod's subsets of ranks that ops can be limited to.

    evens = hvd.ProcessSet([0, 2])
    hvd.init(process_sets=[evens])              # or later: hvd.add_process_set(evens)
    if evens.included():
        hvd.allreduce(x, process_set=evens)
    hvd.remove_process_set(evens)               # and add it again later, any number of times

Adding and removing are collective over *all* ranks and agreed by name like any op, so every
rank registers the same set under the same id, and an error (a duplicate of a registered set)
is raised on every rank alike. Sets may be added at any time (Horovod's dynamic process sets,
without ``HOROVOD_DYNAMIC_PROCESS_SETS``). ``global_process_set`` (id 0) holds every rank.
"""

from __future__ import annotations

from collections.abc import Sequence

from .exceptions import ProcessSetError


class ProcessSet:
    """A subset of global ranks. ``size``/``rank`` answer None until registered, as in Horovod."""

    def __init__(self, ranks: Sequence[int]):
        if not isinstance(ranks, (list, tuple, range)) or any(not isinstance(r, int) for r in ranks):
            raise ProcessSetError(
                f"ProcessSet should be initialized with a list of process ranks, got {type(ranks).__name__}\n"
                "HINT: Horovod also took an mpi4py communicator here; pass its ranks instead, "
                "e.g. ProcessSet(list(range(0, hvd.size(), 2)))"
            )
        self.ranks: list[int] = sorted(set(ranks))
        self.process_set_id: int | None = None
        self._my_rank: int | None = None  # this process's global rank, once registered

    def size(self) -> int | None:
        return len(self.ranks) if self.process_set_id is not None else None

    def rank(self) -> int | None:
        """This process's rank within the set (-1 when not a member); None until registered."""
        if self.process_set_id is None:
            return None
        return self.ranks.index(self._my_rank) if self._my_rank in self.ranks else -1

    def included(self) -> bool | None:
        if self._my_rank is None:
            return None
        return self._my_rank in self.ranks

    def _registered(self, set_id: int, my_rank: int) -> None:
        self.process_set_id, self._my_rank = set_id, my_rank

    def _invalidate(self) -> None:
        self.process_set_id = None

    def __repr__(self) -> str:
        return f"ProcessSet(process_set_id={self.process_set_id}, ranks={self.ranks})"


global_process_set = ProcessSet([])
