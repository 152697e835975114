"""The archiver's one error root: everything it refuses to build says why."""

from __future__ import annotations


class ArchiverError(Exception):
    """A model config, weights file or archive the archiver refuses, with the reason."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
