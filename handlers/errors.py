"""The one error tree of serveready: every error carries its HTTP status and its exit code.

    ServereadyError (500, exit 1)      root: anything this library refuses or cannot do
    ├── HandlerError (500)             a request the handler could not answer
    │   ├── InvalidInput (400)         the request itself is wrong; its message goes to the client
    │   │   └── UnsupportedMediaType (415)  a format this host cannot read, saying what to install
    │   └── ExplanationsUnavailable (501)  this archive or host cannot explain (no gradients, no captum)
    ├── ModelLoadError (500)           the archive's model cannot be loaded (also a RuntimeError, so
    │   │                              TorchServe reports the load failure instead of
    │   │                              crash-looping on an unexpected exception type)
    │   └── ConfigError (500)          an option in a config is unknown, missing or wrong, naming its key
    ├── ArchiveError (500)             a .mar that is unreadable, changed since its build, or not signed
    ├── ArchiverError                  a model config, weights file or build the archiver refuses
    └── ScriptError                    a command-line tool failed (one line on stderr, exit 1)
        └── ServerError (its status)   the server answered an HTTP error; ``status`` is its code
            └── NotFound (404)         the server does not know the model

Callers branch on the type (and ``status``), never on the message. Every class calls
``super().__init__(message)`` and keeps the text in ``message``.

Only the standard library: this module travels inside every archive.
"""

from __future__ import annotations


class ServereadyError(Exception):
    """Root of every error this library raises."""

    #: the HTTP status a server answers this error with
    status: int = 500
    #: the exit status a command-line tool ends with
    exit_code: int = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class HandlerError(ServereadyError):
    """A request the handler could not answer; the root of every request-time error."""


class InvalidInput(HandlerError):
    """The client sent something the model cannot take; answered with 400."""

    status = 400


class UnsupportedMediaType(InvalidInput):
    """A format this host cannot read (an audio codec without its library); answered with 415, saying what to install."""

    status = 415


class ExplanationsUnavailable(HandlerError):
    """This archive or host cannot compute explanations; answered with 501."""

    status = 501


class ModelLoadError(ServereadyError, RuntimeError):
    """The archive's model, weights or config cannot be loaded."""


class ConfigError(ModelLoadError):
    """A configuration value is unknown, missing or of the wrong type; the message names its key."""


class ArchiveError(ServereadyError):
    """A ``.mar`` that cannot be read, fails its SHA256SUMS, or is not signed by the expected key."""


class ArchiverError(ServereadyError):
    """A model config, weights file or archive the archiver refuses, with the reason."""


class ScriptError(ServereadyError):
    """A command-line tool failed; printed as one line, and the tool exits with ``exit_code``."""


class ServerError(ScriptError):
    """The server answered an HTTP error: ``status`` is the code it sent."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class NotFound(ServerError):
    """The server does not know the model (HTTP 404)."""

    def __init__(self, message: str, status: int = 404) -> None:
        super().__init__(message, status)
