"""One exception hierarchy for bac-node.

Every error carries a one-line message a user can act on. Messages name files and
DICOM instances by path or UID, never by patient name or ID. The CLI turns these
into ``Error: <message>`` and a non-zero exit status; everything else is a bug.
"""

from __future__ import annotations

from pathlib import Path


class BacNodeError(Exception):
    """Base class of every error bac-node expects and explains."""


class ConfigError(BacNodeError):
    """A setting is missing, malformed or out of range."""


class InvalidInstanceError(BacNodeError):
    """A file is not a DICOM instance bac-node can analyse."""

    def __init__(self, source: Path | str, reason: str) -> None:
        self.source = str(source)
        self.reason = reason
        super().__init__(f"{self.source}: {reason}")


class UnsupportedTransferSyntaxError(InvalidInstanceError):
    """The pixel data is encoded in a transfer syntax bac-node cannot decode."""


class StudyError(BacNodeError):
    """A study cannot be analysed as a whole (for example no usable view)."""


class ModelError(BacNodeError):
    """The model weights are missing, corrupt or incompatible."""


class StorageError(BacNodeError):
    """Data could not be written durably (disk full, permissions)."""
