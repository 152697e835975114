"""Typed options, validated once: one frozen dataclass per handler kind, and how to load the model.

The archiver validates a model config's ``handler:`` section with these classes at
build time, and the handler validates the archive's ``model-config.yaml`` with the
same classes at ``initialize``: a misspelt, missing or mistyped option fails the
build naming its key, instead of answering every request with a puzzling 400.

An archive's ``model-config.yaml`` holds TorchServe's own keys plus two sections::

    handler:                  # TabularOptions, ImageOptions, or a user handler's own options class
      input_width: 10
      torch_threads: 1
    model:                    # ModelOptions, written by the archiver
      format: eager
      class_name: Net
      kwargs: {in_features: 10, hidden: 20}
      sample_shape: [2, 10]

Only the standard library: this module travels inside every archive, and the management
tools import it without torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from .errors import ConfigError

T = TypeVar("T")


class DeviceType(str, Enum):
    """Where a model's workers run; the one source for CLI choices too."""

    CPU = "cpu"
    GPU = "gpu"


def option(default: Any = dataclasses.MISSING, *, doc: str = "", minimum: float | None = None, maximum: float | None = None, factory: Any = None) -> Any:
    """A dataclass field with bounds and a one-line description (``ts-archive init`` writes it as a comment)."""
    metadata = {"doc": doc, "min": minimum, "max": maximum}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def parse(cls: type[T], values: Mapping[str, Any] | None, section: str) -> T:
    """Build the options dataclass ``cls`` from a config mapping.

    Args:
        cls: a dataclass whose fields are the allowed keys, typed and optionally bounded by :func:`option`.
        values: the mapping read from YAML (None counts as empty).
        section: the mapping's place in the config (``handler``), used in messages.

    Raises:
        ConfigError: naming ``section.key`` for an unknown key, a missing required value, a
            value of the wrong type or out of bounds, or a cross-check the class itself makes.
    """
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ConfigError(f"{section} must be a mapping of options, got {_shown(values)}")
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(str(k) for k in values if k not in known)
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(known), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{section}.{unknown[0]} is not a known key{hint} (known: {', '.join(known)})")
    hints = get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, spec in known.items():
        where = f"{section}.{name}"
        if name not in values:
            if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where} is required: {describe(hints[name])}{_doc(spec)}")
            continue
        value = coerce(values[name], hints[name], where)
        _check_bounds(value, spec.metadata, where)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigError as err:  # a cross-check in __post_init__ names its key without the section
        raise ConfigError(f"{section}.{err.message}") from None


def to_mapping(options: Any) -> dict[str, Any]:
    """The YAML-ready mapping of an options dataclass: enums as values, tuples as lists, unset (None) keys left out."""
    out: dict[str, Any] = {}
    for spec in dataclasses.fields(options):
        value = getattr(options, spec.name)
        if value is not None:
            out[spec.name] = _plain(value)
    return out


def coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against the type ``hint`` (and converted: list -> tuple, str -> Enum, int -> float)."""
    origin = get_origin(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where} must be {describe(hint)}, got {_shown(value)}")
    if origin is Literal:
        if value in get_args(hint) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be {describe(hint)}, got {_shown(value)}")
    if isinstance(hint, type) and issubclass(hint, Enum):
        try:
            return hint(value)
        except ValueError:
            raise ConfigError(f"{where} must be {describe(hint)}, got {_shown(value)}") from None
    if origin is tuple:
        item = get_args(hint)[0]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be {describe(hint)}, got {_shown(value)}")
        return tuple(coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{where} must be {describe(hint)}, got {_shown(value)}")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif hint is str:
        if isinstance(value, str) and value:
            return value
    else:
        raise TypeError(f"options type {hint!r} of {where} is not supported")
    raise ConfigError(f"{where} must be {describe(hint)}, got {_shown(value)}")


def describe(hint: Any) -> str:
    """What a type hint admits, in words: 'an int', 'a list of numbers', 'one of 'a', 'b''."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        words = [describe(a) for a in get_args(hint) if a is not type(None)]
        return " or ".join(words) + (" (or null)" if type(None) in get_args(hint) else "")
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(hint))
    if isinstance(hint, type) and issubclass(hint, Enum):
        return "one of " + ", ".join(repr(m.value) for m in hint)
    if origin is tuple:
        inner = describe(get_args(hint)[0]).removeprefix("an ").removeprefix("a ")
        return f"a list of {inner}s"
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        return "a mapping"
    return {bool: "true or false", int: "an int", float: "a number", str: "a non-empty string"}.get(hint, "any value")


def _check_bounds(value: Any, metadata: Mapping[str, Any], where: str) -> None:
    low, high = metadata.get("min"), metadata.get("max")
    items = value if isinstance(value, tuple) else (value,)
    for item in items:
        if not isinstance(item, (int, float)) or isinstance(item, bool):
            continue
        if low is not None and item < low:
            raise ConfigError(f"{where} must be at least {low:g}, got {_shown(value)}")
        if high is not None and item > high:
            raise ConfigError(f"{where} must be at most {high:g}, got {_shown(value)}")


def _doc(spec: dataclasses.Field) -> str:
    doc = spec.metadata.get("doc")
    return f" ({doc})" if doc else ""


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _shown(value: Any) -> str:
    text = repr(list(value) if isinstance(value, tuple) else value)
    if value is None:
        text = "null"
    return text if len(text) <= 60 else text[:57] + "..."


# -- the options -------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class HandlerOptions:
    """Options every handler takes; a handler kind's own class adds to them."""

    torch_threads: int | None = option(None, minimum=1, doc="torch threads per worker; default: cores / maxWorkers")
    ig_steps: int = option(50, minimum=1, maximum=10_000, doc="Integrated Gradients steps for /explanations")
    metrics: bool = option(True, doc="the handler's own counters, handed to the host once a second, not per batch")
    fold_batchnorm: bool = option(False, doc="fold each BatchNorm into the convolution or Linear before it (torch.fx), checked at load")
    channels_last: bool = option(False, doc="convolution weights and images in channels-last memory, oneDNN's fast layout, checked at load")


@dataclass(frozen=True, kw_only=True)
class TabularOptions(HandlerOptions):
    """Rows of numbers in, one prediction row per input row out."""

    input_width: int | None = option(None, minimum=1, doc="numbers per row; default: the last of model.sample_shape")
    max_rows: int = option(1024, minimum=1, doc="larger requests get 400")


@dataclass(frozen=True, kw_only=True)
class ImageOptions(HandlerOptions):
    """One image in, its top-k classes out; resized, cropped and normalised as torchvision does."""

    classes_file: str | None = option(None, doc="class names: JSON {index: name} or [names], or text with one name per line")
    top_k: int = option(3, minimum=1, doc="classes answered by default; a request may ask for 1..classes")
    max_pixels: int = option(25_000_000, minimum=1, doc="larger images get 400, checked before decoding; so do images resize would make larger")
    resize: tuple[int, ...] | None = option(None, minimum=1, doc="[size]: shorter side to size, keeping aspect; [h, w]: exactly")
    crop: tuple[int, ...] | None = option(None, minimum=1, doc="[size] or [h, w] centre crop after resize")
    mean: tuple[float, ...] | None = option(None, doc="per-channel mean subtracted after scaling to 0..1")
    std: tuple[float, ...] | None = option(None, doc="per-channel standard deviation divided by")

    def __post_init__(self) -> None:
        for key in ("resize", "crop"):
            value = getattr(self, key)
            if value is not None and len(value) not in (1, 2):
                raise ConfigError(f"{key} must be [size] or [height, width], got {list(value)}")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ConfigError(f"std must be positive, got {list(self.std)}")


@dataclass(frozen=True, kw_only=True)
class TextOptions(HandlerOptions):
    """Texts in, each text's top-k classes out; tokenized with the archive's Hugging Face tokenizer.json."""

    tokenizer: str = option(doc="the Hugging Face tokenizer.json, one of the archive's extra_files")
    max_length: int = option(128, minimum=2, doc="tokens per text, special tokens included; longer texts are truncated, and the answer says so")
    max_texts: int = option(64, minimum=1, doc="texts per request; more get 400")
    max_chars: int = option(10_000, minimum=1, doc="characters per text; longer texts get 400 before they are tokenized")
    classes_file: str | None = option(None, doc="class names: JSON {index: name} or [names], or text with one name per line")
    top_k: int = option(3, minimum=1, doc="classes answered by default; a request may ask for 1..classes")
    embedding_layer: str = option("embedding", doc="the module whose output explanations attribute (Layer Integrated Gradients)")


@dataclass(frozen=True, kw_only=True)
class AudioOptions(HandlerOptions):
    """A clip in, its top-k classes out: any WAV (or what soundfile reads) made mono, resampled, padded or trimmed."""

    sample_rate: int = option(16000, minimum=1000, maximum=384000, doc="Hz the model takes; every clip is resampled to it")
    features: Literal["waveform", "log_mel"] = option("waveform", doc="waveform: [batch, samples] in [-1, 1]; log_mel: [batch, n_mels, frames]")
    n_fft: int = option(400, minimum=16, doc="log_mel: FFT size and Hann window length (torchaudio's MelSpectrogram)")
    hop_length: int = option(160, minimum=1, doc="log_mel: samples between frames")
    n_mels: int = option(64, minimum=1, doc="log_mel: mel bands")
    f_min: float = option(0.0, minimum=0, doc="log_mel: lowest frequency, Hz")
    f_max: float | None = option(None, minimum=1, doc="log_mel: highest frequency, Hz (default: sample_rate / 2)")
    max_seconds: float = option(30.0, minimum=0.01, doc="longer clips get 400, judged from the header before decoding")
    max_channels: int = option(8, minimum=1, doc="clips with more channels get 400")
    classes_file: str | None = option(None, doc="class names: JSON {index: name} or [names], or text with one name per line")
    top_k: int = option(3, minimum=1, doc="classes answered by default; a request may ask for 1..classes")

    def __post_init__(self) -> None:
        top = self.f_max if self.f_max is not None else self.sample_rate / 2
        if top > self.sample_rate / 2 or self.f_min >= top:
            raise ConfigError(f"f_min {self.f_min:g} and f_max {top:g} must satisfy 0 <= f_min < f_max <= sample_rate / 2 ({self.sample_rate / 2:g})")
        if self.hop_length > self.n_fft:
            raise ConfigError(f"hop_length {self.hop_length} exceeds n_fft {self.n_fft}: frames would skip samples")


@dataclass(frozen=True, kw_only=True)
class ModelOptions:
    """How the handler loads the archive's model; the archiver writes it as model-config.yaml's ``model:``."""

    format: str = option("eager", doc="which loader: eager, int8_dynamic, int8_static, half, onnx, exported")
    class_name: str | None = option(None, doc="the nn.Module class in the archive's model file (formats that rebuild it)")
    kwargs: dict[str, Any] = option(factory=dict, doc="keyword arguments of the class")
    sample_shape: tuple[int, ...] = option(minimum=1, doc="a batch of zeros of this shape runs through the model")
    dtype: Literal["float16", "bfloat16"] | None = option(None, doc="half-precision archives: the weights' dtype")
    inputs: tuple[str, ...] | None = option(None, doc="the forward's input names, in order, where it takes several (a text model's)")

    def __post_init__(self) -> None:
        if len(self.sample_shape) < 2:
            raise ConfigError(f"sample_shape must be [batch, features...] with at least two sizes, got {list(self.sample_shape)}")
