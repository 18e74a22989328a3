"""collectives.objects: bytes and JSON objects over every backend (real ranks), and the packing
of bytes and odd dtypes into int32 words it and its callers (checkpointer, horovod functions,
pipeline wire) share."""

from __future__ import annotations

import pytest
import torch

from collectives import objects, registry
from tests.support.harness import spawn

BACKENDS = [b for b in registry.available() if b not in ("nccl", "horovod")]


@pytest.mark.unit
@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 1023])
def test_bytes_round_trip_through_words(n):
    data = bytes((i * 7 + 1) % 256 for i in range(n))
    words = objects.to_words(data)
    assert words.dtype == torch.int32 and words.numel() == -(-n // 4)
    assert objects.from_words(words, n) == data
    blanks = objects.to_words(b'{"a": 1}x', fill=b" ")
    assert objects.from_words(blanks) == b'{"a": 1}x   '


@pytest.mark.unit
@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int8, torch.int16, torch.float16])
@pytest.mark.parametrize("shape", [[0], [3], [2, 5], [7, 1, 3]])
def test_tensors_of_any_dtype_round_trip_through_words(dtype, shape):
    t = (torch.arange(torch.Size(shape).numel()).reshape(shape) % 3).to(dtype)
    words = objects.tensor_as_words(t)
    buf = objects.words_buffer(shape, dtype)
    assert words.dtype == torch.int32 and buf.shape == words.shape
    buf.copy_(words)
    back = objects.tensor_from_words(buf, shape, dtype)
    assert back.dtype == dtype and back.shape == t.shape and torch.equal(back, t)


@pytest.mark.timeout(200)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bytes_and_json_objects_over_a_backend(backend):
    world = 3
    out = spawn("tests.cases.objects:objects_case", world, args={"backend": backend}, timeout=150)
    sent = [(bytes(range(r * 5 % 256)) + "é".encode() * r).hex() for r in range(world)]
    for r, got in enumerate(out):
        assert got["gathered"] == sent, (r, got["gathered"])
        assert got["broadcast"] == (b"\x00\xffroot" * 3 + b"!").hex() and got["empty"] == ""
        assert got["records"] == [{"rank": i, "names": ["a" * i], "nested": {"x": [i, None]}} for i in range(world)]
        assert got["plan"] == {"step": 7, "ok": True, "text": "ünï"}
