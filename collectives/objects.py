"""Bytes and JSON objects over any backend: the one place bytes are packed into tensors.

Every backend moves int32 tensors, so bytes travel as int32 words, padded to a multiple of 4
(:func:`to_words`, :func:`from_words`), and a tensor of a dtype a backend does not move travels
as the words of its bytes (:func:`tensor_as_words`, :func:`words_buffer`, :func:`tensor_from_words`).
On top of those, collectives over a :class:`Communicator` (lowercase, as mpi4py names the ones
that move objects rather than buffers):

    sizes = allgather_bytes(comm, payload)        # every rank's bytes, in rank order
    plan = broadcast_json(comm, plan, src=0)      # src's JSON-able object on every rank

Objects are JSON, never pickles: bytes from a peer are data, not code. Each function is a
collective over the group unless it says otherwise (every rank calls it, in the same order), and
blocks until its part is done.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .communicator import Communicator


# -- packing (no communication) ----------------------------------------------------------------
def to_words(data: bytes, fill: bytes = b"\0") -> torch.Tensor:
    """``data`` as int32 words (a new tensor), padded to a multiple of 4 bytes with ``fill``
    (one byte; a JSON text may pad with blanks, which its parser ignores)."""
    pad = (-len(data)) % 4
    if not data:
        return torch.empty(0, dtype=torch.int32)
    return torch.frombuffer(bytearray(data + fill * pad), dtype=torch.int32).clone()


def from_words(words: torch.Tensor, n: int | None = None) -> bytes:
    """The first ``n`` bytes of ``words`` (all of them when None)."""
    raw = words.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes()
    return raw if n is None else raw[:n]


def tensor_as_words(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t`` (any dtype) as int32 words, padded with zeros; for dtypes a backend does
    not move (bool, uint8, int8, int16, ...)."""
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
    pad = (-raw.numel()) % 4
    if pad:
        raw = torch.cat([raw, raw.new_zeros(pad)])
    return raw.view(torch.int32)


def words_buffer(
    shape: list[int] | torch.Size, dtype: torch.dtype, device: torch.device | str | None = None
) -> torch.Tensor:
    """An int32 buffer (on ``device``) that receives the words :func:`tensor_as_words` makes of a
    ``shape``/``dtype`` tensor."""
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    return torch.empty((nbytes + 3) // 4, dtype=torch.int32, device=device)


def tensor_from_words(words: torch.Tensor, shape: list[int] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """The ``shape``/``dtype`` tensor whose bytes ``words`` holds (a copy)."""
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    return words.view(torch.uint8)[:nbytes].view(dtype).reshape(shape).clone()


# -- collectives over a Communicator -----------------------------------------------------------
def allgather_bytes(comm: Communicator, data: bytes) -> list[bytes]:
    """Collective: every rank's ``data`` (lengths may differ), in group rank order."""
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(comm.world_size)]
    comm.allgather(sizes, torch.tensor([len(data)], dtype=torch.int64))
    lens = [int(s) for s in sizes]
    width = -(-max(lens) // 4)
    mine = torch.zeros(width, dtype=torch.int32)
    if data:
        mine[: -(-len(data) // 4)] = to_words(data)
    outs = [torch.zeros(width, dtype=torch.int32) for _ in range(comm.world_size)]
    comm.allgather(outs, mine)
    return [from_words(o, n) for o, n in zip(outs, lens)]


def broadcast_bytes(comm: Communicator, data: bytes | None, src: int = 0) -> bytes:
    """Collective: rank ``src``'s ``data`` on every rank (the others pass None)."""
    size = torch.tensor([len(data or b"")], dtype=torch.int64)
    comm.broadcast(size, src=src)
    n = int(size)
    words = to_words(data or b"") if comm.rank == src else torch.zeros(-(-n // 4), dtype=torch.int32)
    comm.broadcast(words, src=src)
    return (data or b"") if comm.rank == src else from_words(words, n)


def allgather_json(comm: Communicator, obj: Any) -> list[Any]:
    """Collective: every rank's JSON-able ``obj``, in group rank order."""
    return [json.loads(raw) for raw in allgather_bytes(comm, json.dumps(obj).encode())]


def broadcast_json(comm: Communicator, obj: Any, src: int = 0) -> Any:
    """Collective: rank ``src``'s JSON-able ``obj`` on every rank (the others' ``obj`` is ignored)."""
    raw = broadcast_bytes(comm, json.dumps(obj).encode() if comm.rank == src else None, src)
    return obj if comm.rank == src else json.loads(raw)
