"""Custom TorchServe handlers: shared validation, batching and loading.

The package travels inside every archive (``handlers/``), so a TorchServe
host needs only torch, not this library, to serve it.
"""

from handlers.base import BatchHandler, error_body
from handlers.errors import HandlerError, InvalidInput, ModelLoadError
from handlers.tabular import TabularHandler

__all__ = [
    "BatchHandler",
    "HandlerError",
    "InvalidInput",
    "ModelLoadError",
    "TabularHandler",
    "error_body",
]
