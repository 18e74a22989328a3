"""Per-op agreement between the ranks of a process set, ahead of the data transfer.

Why: Horovod's background coordinator matches ops by name, so a rank that called ``join()``
keeps answering the others' allreduces with zeros, and a shape mismatch comes back as an
error on every rank instead of a hang. Our communicators instead need every rank to issue
the same ops in the same order. A :class:`Channel` bridges the two: before each op, every
member runs one fixed-shape allgather of four int64 per rank (digest of the op's
fingerprint, joined flag, first dimension, join round) on a *control* communicator of its
own, so the agreement never waits behind a large transfer still running on the *data*
communicator. Every rank then holds the same table and reaches the same verdict:

* all digests equal: go (the table also carries each rank's first dimension, which is all
  an allgather with ragged first dimensions needs);
* digests differ: the ranks exchange their full 512-byte fingerprints (a second fixed-shape
  allgather) and every rank raises :class:`HorovodInternalError` naming both sides;
* some ranks joined: the op must be an allreduce (as in Horovod 0.28); the joined ranks read
  its fingerprint and contribute zeros, everyone else proceeds; any other op raises on all.

Cost: one small collective per op on the control communicator (about the cost of the
cross-rank check ``collectives`` runs anyway, which the data communicator skips).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import torch

from collectives import CollectivesError, Communicator, ReduceOp
from collectives.fingerprint import ENCODED_SIZE, Fingerprint, mismatch_error

from .exceptions import HorovodInternalError

_HERE = os.path.dirname(os.path.abspath(__file__))
_TORCH = os.path.dirname(torch.__file__)
ROW = 4  # int64 per rank: digest, joined, first dim, join round
JOINABLE = ("allreduce",)  # Horovod 0.28 supports only allreduce while a rank has joined


def user_site() -> str:
    """file:line of the user's call: the first frame outside this package and torch."""
    import sys

    frame = sys._getframe(1)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if not (path.startswith(_HERE) or path.startswith(_TORCH)):
            return f"{frame.f_code.co_filename}:{frame.f_lineno}"
        frame = frame.f_back
    return "<unknown>"


@dataclasses.dataclass
class Agreement:
    """What every rank learned from one negotiation (identical on all members)."""

    dims: list[int]  # first dimension per set rank (allgather, alltoall)
    joined: list[bool]  # set ranks inside join()
    rounds: list[int]  # join rounds per rank (0: joined in this very round)
    op: Fingerprint | None = None  # the active ranks' op, when some rank joined
    splits: list[list[int]] | None = None  # alltoall: splits[src][dst] in first-dim rows


class Channel:
    """The communicators behind one process set. Members only; every call is collective
    over the set, in the same order on every member, and blocks until all members arrive."""

    def __init__(self, data: Communicator, ctl: Communicator, set_id: int, global_ranks: Sequence[int]):
        self.data, self.ctl, self.set_id = data, ctl, set_id
        self.global_ranks = list(global_ranks)
        self.group = f"process_set{set_id}"
        self._seq = 0

    @property
    def rank(self) -> int:
        return self.data.rank

    @property
    def size(self) -> int:
        return self.data.world_size

    def fingerprint(self, op: str, shapes, dtype, extra: str = "", name: str | None = None) -> Fingerprint:
        seq, self._seq = self._seq, self._seq + 1
        site = user_site() + (f" ({name})" if name else "")
        return Fingerprint(
            seq,
            op,
            self.group,
            tuple(tuple(int(d) for d in s) for s in shapes),
            str(dtype).removeprefix("torch."),
            extra,
            self.global_ranks[self.rank],
            site,
        )

    # -- the agreement -------------------------------------------------------------------
    def negotiate(
        self,
        fp: Fingerprint,
        *,
        dim0: int = 0,
        splits: Sequence[int] | None = None,
        joined: bool = False,
        round_: int = 0,
    ) -> Agreement:
        W = self.size
        mine = torch.tensor([fp.digest(), int(joined), int(dim0), int(round_)], dtype=torch.int64)
        if W == 1:
            return Agreement([int(dim0)], [joined], [round_], splits=[list(splits)] if splits is not None else None)
        table = torch.empty(W, ROW, dtype=torch.int64)
        self._ctl("allgather", lambda: self.ctl.allgather(list(table.unbind(0)), mine))
        rows = table.tolist()
        ag = Agreement([r[2] for r in rows], [bool(r[1]) for r in rows], [r[3] for r in rows])
        active = [i for i in range(W) if not ag.joined[i]]
        if not active:
            return ag
        digests = {rows[i][0] for i in active}
        if len(digests) > 1 or len(active) < W:
            fps = self._exchange_fingerprints(fp)
            if len(digests) > 1:
                ref = fp if not joined else fps[active[0]]
                other = next(fps[i] for i in active if rows[i][0] != ref.digest())
                raise HorovodInternalError(str(mismatch_error(ref, other))) from None
            ag.op = fps[active[0]]
            if ag.op.op not in JOINABLE:
                who = ", ".join(str(self.global_ranks[i]) for i in range(W) if ag.joined[i])
                raise HorovodInternalError(
                    f"rank {self.global_ranks[self.rank]}: {ag.op.op} is not supported with Join at this time "
                    f"(ranks {who} already called join()); {ag.op.describe()}\n"
                    "HINT: as in Horovod, only allreduce (e.g. DistributedOptimizer gradients) may run while "
                    "some ranks have joined; finish other collectives before join()"
                )
        if splits is not None and not joined:
            mat = torch.empty(W, W, dtype=torch.int64)
            row = torch.tensor(list(splits), dtype=torch.int64)
            self._ctl("alltoall splits", lambda: self.ctl.allgather(list(mat.unbind(0)), row))
            ag.splits = mat.tolist()
        return ag

    def _exchange_fingerprints(self, fp: Fingerprint) -> list[Fingerprint]:
        raw = torch.frombuffer(bytearray(fp.encode()), dtype=torch.uint8)
        full = torch.empty(self.size, ENCODED_SIZE, dtype=torch.uint8)
        # uint8 is not a wire dtype of every backend: ship the bytes as int32 words.
        words = raw.view(torch.int32)
        out = full.view(torch.int32)
        self._ctl("fingerprint exchange", lambda: self.ctl.allgather(list(out.unbind(0)), words))
        return [Fingerprint.decode(bytes(full[i].numpy())) for i in range(self.size)]

    def _ctl(self, what: str, fn) -> None:
        try:
            fn()
        except CollectivesError as exc:
            raise HorovodInternalError(f"{self.group}: negotiation ({what}) failed: {exc}") from exc

    # -- join ----------------------------------------------------------------------------
    def join(self) -> int:
        """This rank has no more data: answer the others' allreduces with zeros until every
        member has joined. Returns the global rank that joined last."""
        round_ = 0
        while True:
            fp = self.fingerprint("join", [], "none")
            ag = self.negotiate(fp, joined=True, round_=round_)
            if all(ag.joined):
                last = max(i for i, r in enumerate(ag.rounds) if r == 0)
                return self.global_ranks[last]
            self.mirror(ag.op)
            round_ += 1

    def mirror(self, fp: Fingerprint) -> None:
        """A joined rank's side of the active ranks' allreduce: zeros of every fused part."""
        fields = dict(kv.split("=", 1) for kv in fp.extra.split(";") if "=" in kv)
        op = ReduceOp(fields["op"])
        for part in filter(None, fields.get("parts", "").split(",")):
            dtype, numel = part.split(":")
            zeros = torch.zeros(int(numel), dtype=getattr(torch, dtype))
            try:
                self.data.allreduce(zeros, op)
            except CollectivesError as exc:
                raise HorovodInternalError(f"{self.group}: join's zero allreduce failed: {exc}") from exc

    def close(self) -> None:
        for comm in (self.ctl, self.data):
            try:
                comm.close()
            except CollectivesError:
                pass
