"""The cross-rank check carried in one fixed-size frame, for backends that do not check inline.

Why: the generic check (``checks.check_collective``) is a second collective before every op: at 4 KiB on
mpi or gloo it doubled an allreduce's time. Here every checked collective of a communicator on the CPU
starts with one allreduce of the same :class:`Frame` on every rank: ``HEADER`` float32 words for the
fingerprint, then room for ``PAYLOAD`` words. A small float32 allreduce (SUM or AVG) rides in the frame
itself, and its result is handed back only once the header agreed; any other op (MIN, MAX, PROD, other dtypes,
larger tensors, broadcasts...) sends the frame with its header alone and starts only once that agreed. So the
small allreduce costs no second message, and the others keep the one extra collective they had. The frame is
always reduced by SUM: MPI runs it as one persistent request (``Backend.repeatable_allreduce``), and persistent
requests match only themselves, so a MAX frame on one rank and a SUM frame on another would hang.

Why a fixed size and dtype: a mismatch must never become a transport mismatch. MPICH hangs on allreduces of
different counts, and gloo aborts the process ("Received data size doesn't match expected size"). Whatever op
each rank calls, every rank's first message is the same frame, so every rank gets a header reduced from every
rank's, and the group stays usable after a mismatch (the mismatched ops never started, or started only inside
the frame and were not handed back).

The header, for the fingerprint's 63-bit base digest cut into K chunks of b bits and the sequence number's b
low bits: for each chunk value c in [1, 2^b] the three words c, -c and c². Every rank writes the same form,
whatever its op. Reduced by SUM, an agreeing group yields exactly N times each rank's own words; conversely,
Σc = N·c_own and Σc² = N·c_own² give Σ(c_j - c_own)² = Σc² - 2·c_own·Σc + N·c_own² = 0, so every c_j equals
c_own. The verdict "result == N x own" is therefore the same on every rank, with no second exchange. (A sum of
fingerprints alone cancels: c+1 and c-1 sum to 2c; their squares do not.) b is chosen so that N·2^(2b) <= 2^24:
every word and every sum is an integer float32 holds exactly.

On a mismatch every rank then exchanges the full fingerprints (``checks.raise_mismatch``), so the error
names both call sites. GPU tensors (nccl, torch on cuda) keep the generic check.
"""

from __future__ import annotations

import ctypes
import math
import struct

import torch

from . import checks
from .backend import Backend
from .fingerprint import Fingerprint
from .types import ReduceOp

HEADER = 64  # float32 words reserved for the fingerprint (51 at most are used, at 65536 ranks)
PAYLOAD = 1024  # float32 words an allreduce may carry: 4 KiB
CARRIED_OPS = (ReduceOp.SUM, ReduceOp.AVG)  # reduced by SUM, as the frame always is (AVG divides afterwards)
_MANTISSA = 24  # float32 holds every integer up to 2^24
_DIGEST_BITS = 63
_MAX_CACHED = 4096
_VIEWS: dict = {}  # (address, bytes) -> the bytes of a float32 operand (as collectives.backends.mpi caches specs)


def chunk_bits(world: int) -> int:
    """Bits per header chunk for ``world`` ranks: the most (up to 11) with world·2^(2b) <= 2^24; 0 when fewer
    than 4 fit (over 65536 ranks: the generic check is used)."""
    b = min(11, (_MANTISSA - (world - 1).bit_length()) // 2)
    return b if b >= 4 else 0


class Frame:
    """One communicator's frame: a float32 tensor of ``HEADER + PAYLOAD`` words, its byte views, and the header
    words of the digests it has carried (cached: a training loop repeats a few dozen calls). Used by one
    thread at a time, for one synchronous op at a time."""

    def __init__(self, backend: Backend):
        world = backend.world_size
        bits = chunk_bits(world)
        if not bits:
            raise ValueError(f"no header chunk fits {world} ranks")
        self.world, self.bits, self.mask = world, bits, (1 << bits) - 1
        self.chunks = math.ceil(_DIGEST_BITS / bits)
        self.used = 12 * (1 + self.chunks)  # bytes of header in use: (seq + chunks) x 3 words x 4 bytes
        self.tensor = torch.zeros(HEADER + PAYLOAD, dtype=torch.float32)
        self.bytes = memoryview(self.tensor.numpy()).cast("B")  # our own tensor: pinning its size is fine
        self.head = self.bytes[: self.used]  # the header words in use
        self._bodies: dict[int, memoryview] = {}
        self._bases: dict[int, tuple[bytes, bytes]] = {}
        self.seqs: list[tuple[bytes, bytes] | None] = [None] * (1 << bits)  # by the seq's low bits, made once
        self._backend, self._run = backend, None

    def runner(self):
        """The ``run(timeout)`` of the frame's SUM allreduce: every rank, blocking."""
        run = self._run
        if run is None:  # set up at the first checked op: the same op on every rank
            run = self._run = self._backend.repeatable_allreduce(self.tensor, ReduceOp.SUM).run
        return run

    def body(self, n: int) -> memoryview:
        """The bytes of the first ``n`` payload words (copied by slice assignment: the cheapest copy here)."""
        view = self._bodies.get(n)
        if view is None:
            view = self._bodies[n] = self.bytes[4 * HEADER : 4 * (HEADER + n)]
        return view

    def header(self, base: int, seq: int) -> tuple[bytes, bytes]:
        """The header for (``base``, ``seq``) and what an agreeing group's SUM leaves there (N x own words)."""
        s, b = self.seq_words(seq), self.base_words(base)
        return s[0] + b[0], s[1] + b[1]

    def agree(self, seq: int, words: tuple[bytes, bytes], timeout: float) -> bool:
        """Every rank, before an op that does not ride in the frame: the frame with its header alone, for the
        base digest whose :meth:`base_words` are ``words`` (a caller's cached copy). Blocks until all arrive;
        returns whether every rank's header agreed (the same verdict on every rank)."""
        s = self.seqs[seq & self.mask]
        if s is None:
            s = self.seq_words(seq)
        head = self.head
        head[:] = s[0] + words[0]
        run = self._run
        if run is None:
            run = self.runner()
        run(timeout)
        return head.tobytes() == s[1] + words[1]

    def seq_words(self, seq: int) -> tuple[bytes, bytes]:
        s = self.seqs[seq & self.mask]
        if s is None:
            s = self.seqs[seq & self.mask] = _words([(seq & self.mask) + 1], self.world)
        return s

    def base_words(self, base: int) -> tuple[bytes, bytes]:
        b = self._bases.get(base)
        if b is None:
            if len(self._bases) >= _MAX_CACHED:
                self._bases.clear()
            chunks = [((base >> (self.bits * i)) & self.mask) + 1 for i in range(self.chunks)]
            b = self._bases[base] = _words(chunks, self.world)
        return b


class CarriedOp:
    """One allreduce signature riding in a frame (kept in the communicator's cached spec): its header
    words and the operand last seen. Calling it runs the op for ``tensor``."""

    __slots__ = ("frame", "avg", "own", "expected", "run", "ptr", "user", "body")

    def __init__(self, frame: Frame, base: int, op: ReduceOp):
        self.frame, self.avg = frame, op is ReduceOp.AVG
        self.own, self.expected = frame.base_words(base)
        self.run = None  # the frame's runner, fetched at the first call (setting it up is collective)
        self.ptr, self.user, self.body = None, None, None

    def __call__(self, tensor: torch.Tensor, seq: int, timeout: float) -> bool:
        """Every rank, for the operand last bound (the caller compares ``data_ptr()`` with :attr:`ptr` and
        calls :meth:`bind` on a change): header and payload in, one allreduce of the frame, and only if the
        header agrees (the same verdict on every rank) the result out into ``tensor``. Returns that verdict."""
        frame = self.frame
        s = frame.seqs[seq & frame.mask]
        if s is None:
            s = frame.seq_words(seq)
        head = frame.head
        head[:] = s[0] + self.own
        self.body[:] = self.user
        self.run(timeout)
        if head.tobytes() != s[1] + self.expected:
            return False
        self.user[:] = self.body
        if self.avg:  # as the backends' AVG: the sum divided in place
            tensor.div_(frame.world)
        return True

    def plain(self, tensor: torch.Tensor, timeout: float) -> None:
        """Checks off, for the operand last bound: the payload alone through the frame's allreduce (the header
        words are left as they are, so what each rank sums there means nothing)."""
        self.body[:] = self.user
        self.run(timeout)
        self.user[:] = self.body
        if self.avg:
            tensor.div_(self.frame.world)

    def bind(self, tensor: torch.Tensor) -> bool:
        """A new operand (or the first) of this signature: its bytes, the frame's slice it fills, and the
        frame's runner (set up at the first call, which is the same op on every rank). False, binding
        nothing, for a tensor off the CPU (the same signature on a GPU: the caller takes the backend's op).
        Checking the device only here is enough: a CPU operand's address is never a device's."""
        if not tensor.is_cpu:
            return False
        self.user = operand(tensor)
        self.body = self.frame.body(tensor.numel())
        self.ptr = tensor.data_ptr()
        if self.run is None:
            self.run = self.frame.runner()
        return True


def _words(values: list[int], mult: int) -> tuple[bytes, bytes]:
    """The header words (c, -c, c² per value) as float32 bytes, and the same times ``mult``."""
    own = [w for c in values for w in (c, -c, c * c)]
    return struct.pack(f"{len(own)}f", *own), struct.pack(f"{len(own)}f", *(w * mult for w in own))


def can_carry(frame: Frame | None, tensor: torch.Tensor, op: ReduceOp) -> bool:
    """Whether an allreduce of ``tensor`` (contiguous) with ``op`` rides in ``frame``. Depends only on what
    the fingerprint covers (dtype, size, op) and the group, so every agreeing rank decides alike."""
    return (
        frame is not None
        and tensor.dtype is torch.float32
        and 0 < tensor.numel() <= PAYLOAD
        and op in CARRIED_OPS
        and tensor.device.type == "cpu"
    )


def operand(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous float32 CPU tensor, cached by address: a view names memory, and is only
    used while a live operand occupies exactly that memory. Built from the address, not ``Tensor.numpy()``,
    which would pin the caller's storage (ZeRO-3 resizes it to free gathered parameters)."""
    key = (tensor.data_ptr(), tensor.nbytes)
    view = _VIEWS.get(key)
    if view is None:
        if len(_VIEWS) >= _MAX_CACHED:
            _VIEWS.clear()
        view = _VIEWS[key] = memoryview((ctypes.c_char * key[1]).from_address(key[0])).cast("B")
    return view


def check_in_frame(backend: Backend, frame: Frame, fp: Fingerprint, timeout: float) -> None:
    """Every rank of the group, before an op that does not ride in the frame: the frame with its header
    alone. Blocks until all arrive; raises on every rank on a mismatch."""
    if not frame.agree(fp.seq, frame.base_words(fp.base), timeout):
        checks.raise_mismatch(backend, fp, timeout)
