"""Errors a handler raises, one HTTP status per meaning.

    HandlerError (500)        root: anything the handler refuses or cannot do
    ├── InvalidInput (400)    the request itself is wrong; its message goes to the client
    ├── ExplanationsUnavailable (501)  the server lacks captum for /explanations
    └── ModelLoadError (500)  the archive cannot be loaded (also a RuntimeError, so
                              TorchServe reports the load failure instead of
                              crash-looping on an unexpected exception type)
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


class ExplanationsUnavailable(HandlerError):
    """The server lacks what explanations need (captum); answered with 501."""

    status = 501
