"""How one communicator call runs: the cross-rank check, the backend op, the wait.

:class:`CallPath` is the part of :class:`~collectives.communicator.Communicator` every op goes
through: its fingerprint (op, shapes, dtype, call site), the check (inline in the backend or
one extra MAX allreduce, see ``collectives.checks``), the backend call and the wait, and a
timeout turned into an error naming the ranks that never arrived. A synchronous call whose
signature was validated before takes the fast path (:meth:`CallPath._call`), reusing a cached
:class:`Spec`. :class:`Handle` is the :class:`Work` async callers get back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from . import carried, checks
from .backend import Backend
from .env import DistEnv
from .errors import CollectivesError, CollectiveTimeoutError
from .fingerprint import Fingerprint, base_digest, call_site
from .flight_recorder import RECORDER
from .types import Work

ORPHANS: list = []  # in-flight work abandoned by an error: never freed, so never written after free
PLAIN = (torch.Tensor, torch.nn.Parameter)  # exact types the fast path accepts (subclasses go the long way)
STRIDED = torch.strided
MAX_SPECS = 1024


class Spec:
    """What repeats between calls of one op with one signature: validated once, then reused."""

    __slots__ = ("op", "shapes", "dtype", "extra", "base", "arg", "fp", "carry", "site", "words")

    def __init__(self, op: str, shapes: tuple, dtype: str, extra: str, group: str, arg=None):
        self.op, self.shapes, self.dtype, self.extra, self.arg = op, shapes, dtype, extra, arg
        self.base = base_digest(op, group, shapes, dtype, extra)
        self.fp: Fingerprint | None = None  # renewed per synchronous call (see Communicator._call)
        self.carry: carried.CarriedOp | None = None  # an allreduce riding in the check's frame
        self.site: tuple[str, int] | str = "<unknown>"  # where it was first called: the flight recorder's site
        self.words: tuple[bytes, bytes] | None = None  # its base digest's header words in the frame, once used


class Handle:
    """The Work returned to callers: waits on the backend's work, names missing ranks on a
    timeout, then runs ``after`` (AVG division, copy-back of non-contiguous tensors)."""

    def __init__(
        self,
        comm: CallPath,
        fp: Fingerprint,
        works: list[Work],
        timeout: float,
        after: list[Callable[[], None]],
        before: Callable[[], None] | None = None,
        members: list[int] | None = None,
    ):
        self._comm, self._fp, self._works, self._timeout, self._members = comm, fp, works, timeout, members
        self._after, self._before, self._done = after, before, False
        self._record: list | None = None  # the flight recorder's entry, ended once complete

    def wait(self, timeout: float | None = None) -> None:
        if self._done:
            return
        timeout = self._timeout if timeout is None else timeout
        try:
            if self._before is not None:
                self._before()
                self._before = None
            for w in self._works:
                w.wait(timeout)
        except CollectiveTimeoutError as exc:
            raise self._comm._timeout_error(self._fp, timeout, exc, self._members) from None
        for fn in self._after:
            fn()
        self._done = True
        if self._record is not None:
            RECORDER.end(self._record)

    def is_completed(self) -> bool:
        return self._done or all(w.is_completed() for w in self._works)


class CallPath:
    """Fingerprint, check, run and wait: the steps every op of a communicator takes."""

    backend: Backend
    env: DistEnv
    check: bool
    timeout: float
    group: str
    global_ranks: list[int]
    store: object
    _inline: bool
    _frame: carried.Frame | None  # the carried check's frame: CPU, not inline, 1 < world <= 65536
    _seq: int
    _grank: int
    _specs: dict[tuple, Spec]

    @property
    def rank(self) -> int:
        return self.backend.rank

    @property
    def world_size(self) -> int:
        return self.backend.world_size

    def _fingerprint(self, op: str, shapes, dtype, extra: str = "", seq: int | None = None) -> Fingerprint:
        if seq is None:
            seq = self._seq
            self._seq += 1
        return Fingerprint(
            seq,
            op,
            self.group,
            tuple(tuple(s) for s in shapes),
            str(dtype).removeprefix("torch."),
            extra,
            self._grank,
            call_site(),
        )

    def _timeout_error(
        self, fp: Fingerprint, timeout: float, cause: Exception | None, members: Sequence[int] | None = None
    ) -> CollectiveTimeoutError:
        members = list(range(self.world_size)) if members is None else list(members)
        try:
            call = f"{fp.seq}" if fp.op != "p2p" else f"p2p{fp.extra.split()[0]}/{fp.seq}"
            missing = checks.missing_ranks(self.store, f"{fp.group}/{call}", self.rank, members)
        except CollectivesError as exc:
            missing, note = None, f" ({exc})"
        else:
            note = ""
        if missing is None:
            who = f"could not tell which ranks are missing (no job store){note}"
        elif missing:
            who = "ranks that never arrived: " + ", ".join(str(self.global_ranks[r]) for r in missing)
        else:
            who = "every rank arrived, so the transport stalled or a peer died during the op"
        detail = f" [{cause}]" if cause is not None and str(cause) else ""
        return CollectiveTimeoutError(
            f"rank {self.env.where}: {fp.op}#{fp.seq} in group {fp.group!r} ({fp.describe()}) did not complete "
            f"within {timeout:g}s; {who}{detail}\n"
            "HINT: a missing rank is usually stuck in compute, waiting on a different collective, or dead; "
            "check its log and traceback. Raise `timeout=` if the op is just slow."
        )

    def _run(
        self,
        fp: Fingerprint,
        start: Callable[..., Work | list[Work] | None],
        after: list,
        async_op: bool,
        timeout: float | None,
        skip: bool = False,
    ) -> Work | None:
        """Check (unless inline or off), start the backend op, then wait or hand back a handle."""
        timeout = self.timeout if timeout is None else timeout
        record = RECORDER.begin(fp.seq, fp.op, self.group, fp.shapes, fp.dtype)
        kwargs = {}
        if self._inline:  # inline backends also run the op on their own thread when async, with our timeout
            kwargs.update(fingerprint=fp if self.check else None, async_op=async_op, timeout=timeout)
        elif self.check:
            try:
                self._check(fp, timeout)
            except CollectiveTimeoutError as exc:
                raise self._timeout_error(fp, timeout, exc) from None
        works = [] if skip else start(**kwargs)
        works = works if isinstance(works, list) else [works]
        handle = Handle(self, fp, [w for w in works if w is not None], timeout, after)
        handle._record = record
        if async_op:
            return handle
        handle.wait(timeout)
        return None

    # -- the fast path -------------------------------------------------------------------
    def _list_key(self, op: str, one: torch.Tensor, many: Sequence[torch.Tensor], arg=None) -> tuple | None:
        """The spec key of a list-taking op that may take the fast path (one tensor per rank, every tensor
        a plain, contiguous, strided one of ``one``'s dtype), built in the same pass; None otherwise (the
        full validation runs)."""
        if type(one) not in PLAIN or len(many) != self.world_size or one.layout is not STRIDED:
            return None
        if not one.is_contiguous():
            return None
        dtype = one.dtype
        key = [op, one.shape, dtype, arg]
        for t in many:
            if type(t) not in PLAIN or t.dtype is not dtype or t.layout is not STRIDED or not t.is_contiguous():
                return None
            key.append(t.shape)
        return tuple(key)

    def _remember(self, key: tuple, spec: Spec) -> None:
        if len(self._specs) >= MAX_SPECS:
            self._specs.clear()
        spec.site = call_site()
        self._specs[key] = spec

    def _call(self, spec: Spec, start: Callable[..., Work], args: tuple, timeout: float | None) -> None:
        """A synchronous op whose arguments were validated before (same signature): fingerprint from
        the cached spec, check (inline or not, unless off), run, wait. Costs a few microseconds."""
        timeout = self.timeout if timeout is None else timeout
        seq = self._seq
        self._seq = seq + 1
        fp = None
        if self.check:  # the op completes before this returns, so the spec's fingerprint is reused
            fp = spec.fp
            if fp is None:  # site None: read off the stack only if an error needs it (the op is still on it)
                fp = spec.fp = Fingerprint(
                    seq, spec.op, self.group, spec.shapes, spec.dtype, spec.extra, self._grank, None, spec.base
                )
            else:
                fp.seq = seq
        record = RECORDER.enter(seq, spec.op, self.group, spec.shapes, spec.dtype, spec.site)
        try:
            if self._inline:
                start(*args, fingerprint=fp, async_op=False, timeout=timeout).wait(timeout)
            else:
                frame = self._frame
                if fp is None:
                    pass
                elif frame is None:
                    checks.check_collective(self.backend, fp, timeout)
                else:  # carried.check_in_frame, with the spec's header words
                    words = spec.words
                    if words is None:
                        words = spec.words = frame.base_words(spec.base)
                    if not frame.agree(seq, words, timeout):
                        checks.raise_mismatch(self.backend, fp, timeout)
                start(*args).wait(timeout)
            RECORDER.end(record)
        except CollectiveTimeoutError as exc:
            spec.fp = None  # its site now names this call
            if fp is None:  # checks off: describe the call only now that it failed
                fp = Fingerprint(
                    seq, spec.op, self.group, spec.shapes, spec.dtype, spec.extra, self._grank, None, spec.base
                )
            raise self._timeout_error(fp, timeout, exc) from None
        except BaseException:
            spec.fp = None
            raise

    def _check(self, fp: Fingerprint, timeout: float) -> None:
        """The check before an op of a backend that does not check inline (the frame's when it has one)."""
        if self._frame is not None:
            carried.check_in_frame(self.backend, self._frame, fp, timeout)
        else:
            checks.check_collective(self.backend, fp, timeout)

    def _carried(self, spec: Spec, tensor: torch.Tensor, timeout: float | None, seq: int, after: list) -> None:
        """A synchronous allreduce riding in the frame (``spec.carry``), the first of its signature (later ones
        take the same steps inlined in ``Communicator.allreduce``). Checks on: its result is handed back only
        once every rank's header agreed (``collectives.carried``); off: the frame's allreduce, no header."""
        timeout = self.timeout if timeout is None else timeout
        record = RECORDER.enter(seq, spec.op, self.group, spec.shapes, spec.dtype, spec.site)
        spec.carry.bind(tensor)  # a CPU tensor (``carried.can_carry``)
        try:
            if not self.check:
                spec.carry.plain(tensor, timeout)
            elif not spec.carry(tensor, seq, timeout):
                self._carry_mismatch(spec, seq, timeout)
        except CollectiveTimeoutError as exc:
            raise self._carry_timeout(spec, seq, timeout, exc) from None
        for fn in after:
            fn()
        RECORDER.end(record)

    def _carry_mismatch(self, spec: Spec, seq: int, timeout: float) -> None:
        """Every rank, once the frame's header disagreed: full fingerprints exchanged, the error raised."""
        fp = Fingerprint(seq, spec.op, self.group, spec.shapes, spec.dtype, spec.extra, self._grank, None, spec.base)
        checks.raise_mismatch(self.backend, fp, timeout)

    def _carry_timeout(self, spec: Spec, seq: int, timeout: float, exc: Exception) -> CollectiveTimeoutError:
        fp = Fingerprint(seq, spec.op, self.group, spec.shapes, spec.dtype, spec.extra, self._grank, None, spec.base)
        return self._timeout_error(fp, timeout, exc)
