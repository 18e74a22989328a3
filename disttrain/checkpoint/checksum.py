"""File checksums: xxh3-128 (non-cryptographic, several GB/s, releases the GIL on large buffers).

A checksum catches torn writes, truncation and bit rot; it is not a signature. The
algorithm name is stored in the manifest so a reader can refuse one it does not know.
"""

from __future__ import annotations

import os

import xxhash

ALGORITHM = "xxh3_128"


def hasher():
    return xxhash.xxh3_128()


def digest(data) -> str:
    """Checksum of a bytes-like object (memoryview, bytes, numpy array)."""
    return xxhash.xxh3_128(data).hexdigest()


def fsync_dir(path: str) -> None:
    """Make a directory's entries (new files, renames) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
