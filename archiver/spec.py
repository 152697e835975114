"""A model's build spec, read from its YAML file in ``model_configs/``.

Paths in the YAML are relative to the project root (the folder that holds
``model_configs/``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from archiver.errors import ArchiverError

# TorchServe's own rule for model names (model-archiver checks the same).
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-.]*$")


class DeviceType(str, Enum):
    """Where a model's workers run; the one source for CLI choices too."""

    CPU = "cpu"
    GPU = "gpu"


#: TorchServe model-config keys a spec's ``serve:`` section may set, with their types.
SERVE_KEYS: Mapping[str, type] = {
    "minWorkers": int,
    "maxWorkers": int,
    "batchSize": int,
    "maxBatchDelay": int,
    "responseTimeout": int,
    "startupTimeout": int,
    "deviceType": str,
    "deviceIds": list,
    "jobQueueSize": int,
}


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to train, verify and archive one model."""

    name: str
    version: str
    model_file: Path
    model_class: str
    weights: Path
    handler_entry: Path
    source: Path
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    sample_shape: tuple[int, ...] = ()
    handler_options: Mapping[str, Any] = field(default_factory=dict)
    extra_files: tuple[Path, ...] = ()
    training: Mapping[str, Any] = field(default_factory=dict)
    serve: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    base: ModelSpec | None = None
    variant: Mapping[str, Any] = field(default_factory=dict)
    fidelity: Mapping[str, Any] = field(default_factory=dict)

    @property
    def archive_name(self) -> str:
        return f"{self.name}.mar"

    @property
    def kind(self) -> str:
        """``fp32`` for a trained model, else its variant kind (``int8_dynamic``, ``onnx``, ...)."""
        return str(self.variant.get("kind", "fp32"))

    @property
    def origin(self) -> ModelSpec:
        """The trained fp32 model this spec derives from (itself for a trained model)."""
        return self.base.origin if self.base else self


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
    base = None
    if raw.get("base"):
        base_path = path.parent / f"{raw['base']}.yaml"
        if not base_path.is_file():
            raise ArchiverError(f"{where}: base {raw['base']!r} has no config {base_path.name} beside it")
        base = load_spec(base_path, root)
        raw = _inherit(_read(base_path), raw)

    def need(mapping: Mapping[str, Any], key: str, section: str = "") -> Any:
        if key not in mapping or mapping[key] in (None, ""):
            raise ArchiverError(f"{where}: missing required key {section + key!r}")
        return mapping[key]

    def section(key: str) -> dict[str, Any]:
        value = raw.get(key) or {}
        if not isinstance(value, dict):
            raise ArchiverError(f"{where}: {key!r} must be a mapping, got {type(value).__name__}")
        return dict(value)

    name = str(need(raw, "name"))
    if not _NAME.match(name):
        raise ArchiverError(f"{where}: name {name!r} must match {_NAME.pattern} (e.g. 'net' or 'digits_int8')")
    model, handler = section("model"), section("handler")
    entry = need(handler, "entry", "handler.")
    options = {k: v for k, v in handler.items() if k != "entry"}
    sample = model.get("sample_shape") or []
    if not (isinstance(sample, list) and sample and all(isinstance(d, int) and d > 0 for d in sample)):
        raise ArchiverError(f"{where}: model.sample_shape must be a list of positive ints, e.g. [2, 10]")
    return ModelSpec(
        name=name,
        version=str(raw.get("version", "1.0")),
        description=str(raw.get("description", "")),
        model_file=root / need(model, "file", "model."),
        model_class=str(need(model, "class", "model.")),
        model_kwargs=dict(model.get("kwargs") or {}),
        sample_shape=tuple(sample),
        weights=root / need(raw, "weights"),
        handler_entry=root / entry,
        handler_options=options,
        extra_files=tuple(root / p for p in raw.get("extra_files") or []),
        training=section("training"),
        serve=_serve_section(section("serve"), where),
        source=path,
        base=base,
        variant=section("variant"),
        fidelity=section("fidelity"),
    )


def _read(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ArchiverError(f"{path}: cannot read model config: {err}") from err
    if not isinstance(raw, dict):
        raise ArchiverError(f"{path}: a model config must be a YAML mapping")
    return raw


#: A variant's weights file is made by the archiver, named after it, with this suffix per kind.
_SUFFIX = {"onnx": ".onnx", "exported": ".pt2"}


def _inherit(base: dict[str, Any], variant: dict[str, Any]) -> dict[str, Any]:
    """A variant's config: its base's, with the variant's sections merged over it."""
    merged = {k: v for k, v in base.items() if k not in ("training", "weights", "description", "fidelity")}
    for key, value in variant.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    kind = str((variant.get("variant") or {}).get("kind", ""))
    merged.setdefault("weights", f"artifacts/{variant.get('name')}{_SUFFIX.get(kind, '.pt')}")
    return merged


def load_specs(config_dir: Path, names: list[str] | None = None) -> list[ModelSpec]:
    """Every ``*.yaml`` in ``config_dir`` (or just ``names``), sorted by name."""
    specs = [load_spec(p) for p in sorted(Path(config_dir).glob("*.yaml"))]
    if names:
        known = {s.name for s in specs}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ArchiverError(f"no model config named {', '.join(unknown)} in {config_dir} (have: {', '.join(sorted(known))})")
        specs = [s for s in specs if s.name in names]
    return specs


def _serve_section(serve: dict[str, Any], where: str) -> dict[str, Any]:
    for key, value in serve.items():
        if key not in SERVE_KEYS:
            raise ArchiverError(f"{where}: serve.{key} is not a TorchServe model-config key (known: {', '.join(SERVE_KEYS)})")
        expected = SERVE_KEYS[key]
        if not isinstance(value, expected) or isinstance(value, bool):
            raise ArchiverError(f"{where}: serve.{key} must be {expected.__name__}, got {value!r}")
        if expected is int and value < (0 if key == "maxBatchDelay" else 1):
            raise ArchiverError(f"{where}: serve.{key} must be positive, got {value}")
    device = serve.get("deviceType", DeviceType.CPU.value)
    if device not in {d.value for d in DeviceType}:
        raise ArchiverError(f"{where}: serve.deviceType must be one of {[d.value for d in DeviceType]}, got {device!r}")
    if serve.get("minWorkers", 1) > serve.get("maxWorkers", serve.get("minWorkers", 1)):
        raise ArchiverError(f"{where}: serve.minWorkers ({serve['minWorkers']}) exceeds serve.maxWorkers ({serve['maxWorkers']})")
    return serve
