"""TorchServe handlers with one shared lifecycle: validation, batching, loading, explanations.

A copy of this package travels inside every archive (``serveready/handlers/``), so a
TorchServe host needs torch and Pillow, nothing of this library, to serve it.

Built-in handlers are named in a model config by their key in :data:`BUILTIN_HANDLERS`
(``handler: {entry: tabular}``); a handler of one's own subclasses :class:`BatchHandler`.
"""

from .base import BatchHandler, Decoded, error_body
from .config import DeviceType, HandlerOptions, ImageOptions, ModelOptions, TabularOptions, option, parse
from .errors import ConfigError, ExplanationsUnavailable, HandlerError, InvalidInput, ModelLoadError
from .image_classifier import ImageClassifierHandler
from .payload import decode_json, json_field, parse_array, parse_rows, request_body
from .tabular import TabularHandler

#: Handlers a model config names by key instead of by path.
BUILTIN_HANDLERS: dict[str, type[BatchHandler]] = {
    "tabular": TabularHandler,
    "image_classifier": ImageClassifierHandler,
}

__all__ = [
    "BUILTIN_HANDLERS",
    "BatchHandler",
    "ConfigError",
    "Decoded",
    "DeviceType",
    "ExplanationsUnavailable",
    "HandlerError",
    "HandlerOptions",
    "ImageClassifierHandler",
    "ImageOptions",
    "InvalidInput",
    "ModelLoadError",
    "ModelOptions",
    "TabularHandler",
    "TabularOptions",
    "decode_json",
    "error_body",
    "json_field",
    "option",
    "parse",
    "parse_array",
    "parse_rows",
    "request_body",
]
