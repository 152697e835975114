"""The archiver's errors: :class:`ArchiverError` in the package's one tree (``serveready.handlers.errors``)."""

from __future__ import annotations

from serveready.handlers.errors import ArchiveError, ArchiverError, ConfigError, ModelLoadError

__all__ = ["ArchiveError", "ArchiverError", "ConfigError", "ModelLoadError"]
