"""Errors a handler raises, one HTTP status per meaning.

    HandlerError (500)                 root: anything the handler refuses or cannot do
    ├── InvalidInput (400)             the request itself is wrong; its message goes to the client
    ├── ExplanationsUnavailable (501)  this archive or host cannot explain (no gradients, no captum)
    └── ModelLoadError (500)           the archive cannot be loaded (also a RuntimeError, so
        │                              TorchServe reports the load failure instead of
        │                              crash-looping on an unexpected exception type)
        └── ConfigError (500)          an option in model-config.yaml is unknown, missing or wrong;
                                       the archiver raises the same at build time
"""

from __future__ import annotations


class HandlerError(Exception):
    """Root of every error raised by this package."""

    status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(HandlerError):
    """The client sent something the model cannot take; answered with 400."""

    status = 400


class ModelLoadError(HandlerError, RuntimeError):
    """The archive's model, weights or config cannot be loaded."""

    status = 500


class ConfigError(ModelLoadError):
    """A configuration value is unknown, missing or of the wrong type; the message names its key."""


class ExplanationsUnavailable(HandlerError):
    """This archive or host cannot compute explanations; answered with 501."""

    status = 501
