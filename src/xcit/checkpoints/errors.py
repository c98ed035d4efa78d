"""The errors the checkpoint readers and writers raise, kept apart so the modules need not import each other."""
from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong with it."""


class WriteError(OSError):
    """A file that could not be written (full disk, read-only folder); whatever was at its path is unchanged."""

    def __str__(self) -> str:
        return f'cannot write {self.filename}: {self.strerror}'
