"""Gradient compression for allreduce: ``Compression.none`` and ``Compression.fp16``, as in Horovod.

``compress`` runs before the allreduce and ``decompress`` after it; fp16 halves the bytes on the
wire for float32/float64 tensors and leaves other dtypes alone.
"""

from __future__ import annotations

import torch


class Compressor:
    """Interface: ``compress(tensor) -> (tensor, ctx)`` and ``decompress(tensor, ctx) -> tensor``."""

    @staticmethod
    def compress(tensor: torch.Tensor):
        raise NotImplementedError

    @staticmethod
    def decompress(tensor: torch.Tensor, ctx):
        raise NotImplementedError


class NoneCompressor(Compressor):
    @staticmethod
    def compress(tensor):
        return tensor, None

    @staticmethod
    def decompress(tensor, ctx):
        return tensor


class FP16Compressor(Compressor):
    @staticmethod
    def compress(tensor):
        dtype = tensor.dtype
        if dtype.is_floating_point and dtype != torch.float16:
            tensor = tensor.type(torch.float16)
        return tensor, dtype

    @staticmethod
    def decompress(tensor, ctx):
        if ctx is not None and ctx.is_floating_point and ctx != tensor.dtype:
            tensor = tensor.type(ctx)
        return tensor


class Compression:
    """Namespace of the compressors, spelled as in Horovod: ``hvd.Compression.fp16``."""

    none = NoneCompressor
    fp16 = FP16Compressor
