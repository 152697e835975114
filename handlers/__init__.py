"""The handler core: one lifecycle for every host, a small surface for every kind of input.

A copy of this package travels inside every archive (``serveready/handlers/``), so a
TorchServe host needs torch and Pillow, nothing of this library, to serve it.

    base          BatchHandler, Decoded: what a handler says (decode a request, encode output rows)
    protocols     the wire formats around every handler: own JSON, KServe v1, Open Inference v2
    engine        the lifecycle: options, device, threads, loading, batching, per-request errors
    torchserve    the TorchServe host: the class an archive's entry module defines
    host          ``serveready.load``: an archive answering in-process, as TorchServe would
    archive       the .mar layout: sums, manifest, model-config, version, signature
    errors        the one error tree (each error carries its HTTP status and exit code)
    config        typed options, validated once
    tabular, image_classifier, text_classifier, audio_classifier   the built-in handlers
    payload, images, audio, labels, inputs, loaders, runtime, observe   their pieces

Built-in handlers are named in a model config by their key in :data:`BUILTINS`
(``handler: {entry: tabular}``); a handler of one's own subclasses :class:`BatchHandler`.
Importing this package loads neither torch nor Pillow: the names below load their modules
when first used, so the management tools (which need only ``archive``, ``config`` and
``errors``) start fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from .config import AudioOptions, DeviceType, HandlerOptions, ImageOptions, ModelOptions, TabularOptions, TextOptions, option, parse
from .errors import (
    ArchiveError,
    ArchiverError,
    ConfigError,
    ExplanationsUnavailable,
    HandlerError,
    InvalidInput,
    ModelLoadError,
    NotFound,
    ScriptError,
    ServereadyError,
    ServerError,
    UnsupportedMediaType,
)

#: Handlers a model config names by key instead of by path: key -> "module:Class".
BUILTINS: dict[str, str] = {
    "tabular": "serveready.handlers.tabular:TabularHandler",
    "image_classifier": "serveready.handlers.image_classifier:ImageClassifierHandler",
    "text_classifier": "serveready.handlers.text_classifier:TextClassifierHandler",
    "audio_classifier": "serveready.handlers.audio_classifier:AudioClassifierHandler",
}

_LAZY = {
    "BatchHandler": "base", "Decoded": "base",
    "Request": "payload", "decode_json": "payload", "json_field": "payload", "parse_array": "payload",
    "parse_rows": "payload", "request_body": "payload",
    "Engine": "engine", "ModelSource": "engine", "Reply": "engine",
    "TorchServeEntry": "torchserve",
    "Answer": "host", "Model": "host", "load": "host",
    "Archive": "archive",
    "TabularHandler": "tabular", "ImageClassifierHandler": "image_classifier", "TextClassifierHandler": "text_classifier",
    "AudioClassifierHandler": "audio_classifier",
}


def builtin(name: str) -> type:
    """The built-in handler class named ``name`` in :data:`BUILTINS`."""
    module, _, cls = BUILTINS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def __getattr__(name: str) -> Any:
    if name == "BUILTIN_HANDLERS":
        return {key: builtin(key) for key in BUILTINS}
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "BUILTINS",
    "BUILTIN_HANDLERS",
    "Answer",
    "AudioClassifierHandler",
    "AudioOptions",
    "Archive",
    "ArchiveError",
    "ArchiverError",
    "BatchHandler",
    "ConfigError",
    "Decoded",
    "DeviceType",
    "Engine",
    "ExplanationsUnavailable",
    "HandlerError",
    "HandlerOptions",
    "ImageClassifierHandler",
    "ImageOptions",
    "InvalidInput",
    "Model",
    "ModelLoadError",
    "ModelOptions",
    "ModelSource",
    "NotFound",
    "Reply",
    "Request",
    "ScriptError",
    "ServerError",
    "ServereadyError",
    "TabularHandler",
    "TabularOptions",
    "TextClassifierHandler",
    "TextOptions",
    "TorchServeEntry",
    "UnsupportedMediaType",
    "builtin",
    "decode_json",
    "json_field",
    "load",
    "option",
    "parse",
    "parse_array",
    "parse_rows",
    "request_body",
]
