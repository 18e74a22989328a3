"""The checkpoint error family. Messages name the file, the rank and the values, then a HINT."""

from __future__ import annotations

from ..errors import DisttrainError


class CheckpointError(DisttrainError):
    """Base class of every checkpoint error."""


class CheckpointCorruptError(CheckpointError):
    """Bytes on disk differ from what the manifest promised (checksum, size, missing file).
    A loader may fall back to an older checkpoint."""


class CheckpointFormatError(CheckpointCorruptError):
    """Malformed input refused before any of it was used: bad header, duplicate keys,
    overlapping byte ranges, paths leaving the directory, unknown format version."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint is intact but does not fit the model/layout asking for it (missing
    tensor, wrong shape). Falling back would not help, so this is fatal."""
