"""A model's build spec, read and validated from its YAML file in ``model_configs/``.

Paths in the YAML are relative to the user's folder: the parent of the folder that
holds the config (``<folder>/model_configs/net.yaml`` -> ``<folder>``; a symlinked config
counts from the folder of the file it links to). Every section is typed: ``handler:`` by
the handler kind's options class, ``training:`` by its hook's, ``variant:`` by its kind's,
``serve:``, ``data:`` and ``fidelity:`` by the classes below. A bad key or value is an :class:`ArchiverError` naming the file and
the key, before anything is trained or packed.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from serveready.handlers.archive import DEFAULT_JOB_QUEUE_SIZE
from serveready.handlers.config import DeviceType, HandlerOptions, ModelOptions, option, parse, to_mapping
from serveready.handlers.errors import ModelLoadError
from serveready.handlers.runtime import forward_parameters

from .datasets import DataFile
from .entries import HandlerEntry, check_top_level_name, resolve
from .errors import ArchiverError, ConfigError
from .training import TrainingHook, resolve_hook
from .variants import KINDS, VariantKind, VariantOptions

if TYPE_CHECKING:
    import torch

# TorchServe's own rule for model names (model-archiver checks the same).
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-.]*$")
#: Top-level keys of a model config.
_KEYS = ("name", "version", "description", "base", "model", "weights", "extra_files", "handler", "training", "data", "variant", "fidelity", "serve")


@dataclass(frozen=True, kw_only=True)
class ServeOptions:
    """TorchServe's model-config keys a spec's ``serve:`` section may set; copied into the archive."""

    minWorkers: int | None = option(None, minimum=1)
    maxWorkers: int | None = option(None, minimum=1)
    batchSize: int | None = option(None, minimum=1)
    maxBatchDelay: int | None = option(None, minimum=0, doc="ms the frontend waits to fill a batch")
    responseTimeout: int | None = option(None, minimum=1, doc="seconds a worker may take per batch")
    startupTimeout: int | None = option(None, minimum=1)
    deviceType: DeviceType = option(DeviceType.CPU)
    deviceIds: tuple[int, ...] | None = option(None, minimum=0)
    # TorchServe's default, 100, answers 503 ("has no worker to serve inference request") to every
    # request beyond it: at 128 closed-loop clients on `net`, 90% of answers, and the 503 storm cut
    # the 200s to 1,341/s. With 1000: 0 errors up to 512 clients, 4,500-4,800 req/s (docs/reliability.md).
    jobQueueSize: int = option(DEFAULT_JOB_QUEUE_SIZE, minimum=1, doc="requests queued per model before TorchServe answers 503")

    def __post_init__(self) -> None:
        if self.minWorkers and self.maxWorkers and self.minWorkers > self.maxWorkers:
            raise ConfigError(f"minWorkers ({self.minWorkers}) exceeds serve.maxWorkers ({self.maxWorkers})")


@dataclass(frozen=True, kw_only=True)
class DataOptions:
    """``data:``: the user's own held-out (and training) tensors, for the report, fidelity bounds and data-hungry variants."""

    file: str = option(doc='torch.save({"x_test": ..., "y_test": ..., "x_train": ..., "y_train": ...}); x_train is optional')
    task: Literal["classification", "regression"] = option(doc="classification: y holds class indices")


@dataclass(frozen=True, kw_only=True)
class Fidelity:
    """``fidelity:``: bounds a variant must meet against its fp32 model on the held-out data, or it is not published."""

    max_abs_diff: float | None = option(None, minimum=0, doc="served numbers (predictions, probabilities)")
    mean_abs_diff: float | None = option(None, minimum=0)
    min_accuracy: float | None = option(None, minimum=0, maximum=1)
    max_accuracy_drop: float | None = option(None, minimum=0, maximum=1, doc="points of accuracy lost against fp32")
    max_mse_ratio: float | None = option(None, minimum=0, doc="MSE no worse than this multiple of fp32's")

    @property
    def bounds(self) -> dict[str, float]:
        """The bounds that are set."""
        return to_mapping(self)


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to train, verify and archive one model."""

    name: str
    version: str
    model_file: Path
    model_class: str
    weights: Path
    handler: HandlerEntry
    source: Path
    handler_options: HandlerOptions = field(default_factory=HandlerOptions)
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    sample_shape: tuple[int, ...] = ()
    extra_files: tuple[Path, ...] = ()
    training: TrainingHook | None = None
    data_file: DataFile | None = None
    serve: ServeOptions = field(default_factory=ServeOptions)
    description: str = ""
    base: ModelSpec | None = None
    variant: Any = field(default_factory=VariantOptions)
    fidelity: Fidelity = field(default_factory=Fidelity)

    @property
    def archive_name(self) -> str:
        return f"{self.name}.mar"

    @property
    def kind(self) -> str:
        """``fp32`` for a trained model, else its variant kind (``int8_dynamic``, ``onnx``, ...)."""
        return str(self.variant.kind)

    @property
    def kind_info(self) -> VariantKind:
        return KINDS[self.kind]

    @property
    def origin(self) -> ModelSpec:
        """The trained fp32 model this spec derives from (itself for a trained model)."""
        return self.base.origin if self.base else self

    @property
    def data(self) -> DataFile | None:
        """The origin's held-out (and training) data: its ``data:`` file, or None."""
        return self.origin.data_file

    @property
    def sample_inputs(self) -> dict[str, torch.Tensor]:
        """The model's named sample inputs, as its handler makes them (zeros of ``sample_shape`` for one input)."""
        return self.handler.handler_class.model_inputs(self.handler_options, self.model_options)

    @property
    def dynamic_dims(self) -> dict[int, tuple[str, int]]:
        """Input dimensions besides the batch that vary between batches (a text model's sequence)."""
        return self.handler.handler_class.dynamic_dims(self.handler_options, self.model_options)

    @property
    def model_options(self) -> ModelOptions:
        """The archive's ``model:`` section: how the handler loads this spec's weights."""
        return ModelOptions(
            format=self.kind_info.format,
            class_name=self.model_class,
            kwargs=dict(self.model_kwargs),
            sample_shape=self.sample_shape,
            dtype=getattr(self.variant, "dtype", None),
            inputs=self.handler.handler_class.input_names(lambda: _forward_parameters(self.model_file, self.model_class)),
        )


@functools.lru_cache(maxsize=64)
def _forward_parameters(model_file: Path, model_class: str) -> tuple[str, ...]:
    try:
        return tuple(forward_parameters(model_file, model_class))
    except ModelLoadError as err:
        raise ArchiverError(err.message) from None


def load_spec(path: Path, root: Path | None = None) -> ModelSpec:
    """Read and validate one model config.

    Args:
        path: the YAML file.
        root: the folder relative paths start from; defaults to the parent of
            the folder holding ``path``.

    Raises:
        ArchiverError: naming the file and the key that is missing or wrong.
    """
    path = Path(path).resolve()
    root = Path(root).resolve() if root else path.parent.parent
    raw = _read(path)
    where = path.name
    try:
        return _spec(path, root, raw)
    except ConfigError as err:
        raise ArchiverError(f"{where}: {err.message}") from None
    except ArchiverError as err:
        raise ArchiverError(err.message if err.message.startswith(where) else f"{where}: {err.message}") from None


def _spec(path: Path, root: Path, raw: dict[str, Any]) -> ModelSpec:
    unknown = [k for k in raw if k not in _KEYS]
    if unknown:
        raise ConfigError(f"{unknown[0]} is not a model config key (known: {', '.join(_KEYS)})")
    base = None
    if raw.get("base"):
        base_path = path.parent / f"{raw['base']}.yaml"
        if not base_path.is_file():
            raise ArchiverError(f"base {raw['base']!r} has no config {base_path.name} beside it")
        base = load_spec(base_path, root)
        if base.base is not None:
            raise ArchiverError(f"base {raw['base']!r} is itself a variant: derive variants from a trained fp32 config")
        raw = _inherit(_read(base_path), raw)
    elif "variant" in raw:
        raise ConfigError("variant needs base: the fp32 config it is derived from")

    name = str(_need(raw, "name"))
    if not _NAME.match(name):
        raise ArchiverError(f"name {name!r} must match {_NAME.pattern} (e.g. 'net' or 'digits_int8')")
    model, handler = _section(raw, "model"), _section(raw, "handler")
    _known(model, "model", ("file", "class", "kwargs", "sample_shape"))
    sample = model.get("sample_shape")
    if not (isinstance(sample, list) and len(sample) >= 2 and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in sample)):
        raise ConfigError(f"model.sample_shape must be a list of at least two positive ints, [batch, features...] (e.g. [2, 10]), got {sample!r}")
    kwargs = model.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ConfigError(f"model.kwargs must be a mapping of the class's keyword arguments, got {kwargs!r}")
    variant = _variant(_section(raw, "variant")) if base is not None else VariantOptions()
    kind = KINDS[variant.kind]
    entry = resolve(str(_need(handler, "entry", "handler.")), root)
    model_file = root / str(_need(model, "file", "model."))
    if kind.ships_model_file:
        check_top_level_name(model_file.stem, f"model file {model_file.name}")
    extra = raw.get("extra_files") or []
    if not isinstance(extra, list) or not all(isinstance(p, str) for p in extra):
        raise ConfigError(f"extra_files must be a list of paths, got {extra!r}")
    spec = ModelSpec(
        name=name,
        version=str(raw.get("version", "1.0")),
        description=str(raw.get("description", "")),
        model_file=model_file,
        model_class=str(_need(model, "class", "model.")),
        model_kwargs=dict(kwargs),
        sample_shape=tuple(sample),
        weights=root / str(_need(raw, "weights")),
        handler=entry,
        handler_options=parse(entry.handler_class.options_type, {k: v for k, v in handler.items() if k != "entry"}, "handler"),
        extra_files=tuple(root / p for p in extra),
        training=resolve_hook(raw["training"], root) if base is None and raw.get("training") is not None else None,
        data_file=_data(raw.get("data"), root),
        serve=parse(ServeOptions, raw.get("serve"), "serve"),
        source=path,
        base=base,
        variant=variant,
        fidelity=parse(Fidelity, raw.get("fidelity"), "fidelity"),
    )
    entry.handler_class.check(spec.handler_options, spec.model_options)
    return spec


def _need(mapping: Mapping[str, Any], key: str, section: str = "") -> Any:
    if key not in mapping or mapping[key] in (None, ""):
        raise ConfigError(f"missing required key {section + key!r}")
    return mapping[key]


def _section(raw: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key!r} must be a mapping, got {type(value).__name__}")
    return dict(value)


def _known(section: Mapping[str, Any], name: str, keys: tuple[str, ...]) -> None:
    for key in section:
        if key not in keys:
            raise ConfigError(f"{name}.{key} is not a known key (known: {', '.join(keys)})")


def _variant(raw: dict[str, Any]) -> VariantOptions:
    kind = raw.get("kind")
    kinds = [k for k, v in KINDS.items() if v.derive is not None]
    if kind not in kinds:
        raise ConfigError(f"variant.kind must be one of {', '.join(map(repr, kinds))}, got {kind!r}")
    return parse(KINDS[kind].options, raw, "variant")


def _data(raw: Any, root: Path) -> DataFile | None:
    if raw is None:
        return None
    options = parse(DataOptions, raw, "data")
    return DataFile(root / options.file, options.task)


def _read(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ArchiverError(f"{path}: cannot read model config: {err}") from err
    if not isinstance(raw, dict):
        raise ArchiverError(f"{path}: a model config must be a YAML mapping")
    return raw


def _inherit(base: dict[str, Any], variant: dict[str, Any]) -> dict[str, Any]:
    """A variant's config: its base's, with the variant's sections merged over it."""
    merged = {k: v for k, v in base.items() if k not in ("training", "weights", "description", "fidelity")}
    for key, value in variant.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    kind = KINDS.get(str((variant.get("variant") or {}).get("kind", "")))
    merged.setdefault("weights", f"artifacts/{variant.get('name')}{kind.suffix if kind else '.pt'}")
    return merged


def load_specs(config_dir: Path, names: list[str] | None = None) -> list[ModelSpec]:
    """Every ``*.yaml`` in ``config_dir``, or just ``names`` (by file name, else by ``name:``), sorted.

    Named configs are read alone (with the bases they derive from), so a broken config
    elsewhere in the folder does not stop them.
    """
    config_dir = Path(config_dir)
    paths = sorted(config_dir.glob("*.yaml"))
    if not paths:
        raise ArchiverError(f"no model configs (*.yaml) in {config_dir.resolve()}: write one with `ts-archive init NAME ...`")
    if names and all(config_dir / f"{n}.yaml" in paths for n in names):
        return [load_spec(config_dir / f"{n}.yaml") for n in sorted(set(names))]
    specs = [load_spec(p) for p in paths]
    if names:
        known = {s.name for s in specs} | {s.source.stem for s in specs}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ArchiverError(f"no model config named {', '.join(unknown)} in {config_dir} (have: {', '.join(sorted(s.name for s in specs))})")
        specs = [s for s in specs if s.name in names or s.source.stem in names]
    return specs
