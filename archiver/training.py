"""Training hooks: a function in the user's folder that a config names, run by ``ts-archive train``.

    training:
      recipe: train.py:fit       # a file (or package.module) in your folder, and the function in it
      seed: 0                    # the rest: the hook's own options
      epochs: 300

The hook is ``def fit(job: TrainingJob, options: MyOptions) -> dict[str, float]``: ``job`` says
where the model file, class, weights and data file are and builds a fresh model; ``options``
is the ``training:`` section without ``recipe``, validated against the annotation's frozen
dataclass (made with :func:`serveready.handlers.option`, so a bad value names its key at
build time, as handler options do). A hook without an ``options`` parameter takes no options.
It trains, saves with ``job.save(model, metrics)`` (a reproducible state_dict and the held-out
metrics beside it) and, to give the report and the data-hungry variants their rows,
``job.save_data(...)`` into the config's ``data:`` file. The library ships no recipe: the
repo's own models train with hooks in ``examples/net/train.py`` and ``examples/digits/train.py``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import io
import json
import sys
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from torch import nn

from serveready.handlers.config import parse
from serveready.handlers.runtime import build_module

from .entries import Named, import_named
from .errors import ArchiverError, ConfigError

if TYPE_CHECKING:
    from .spec import ModelSpec

#: What 0.2's built-in recipes became (their code moved to the repo's example folders).
_MOVED = {"regression": "examples/net/train.py:fit", "digits": "examples/digits/train.py:fit"}


@dataclass(frozen=True)
class TrainingJob:
    """What a training hook is told about the model it trains, and how it saves what it made."""

    name: str
    #: the user's folder (the one holding model_configs/)
    root: Path
    model_file: Path
    model_class: str
    model_kwargs: Mapping[str, Any]
    sample_shape: tuple[int, ...]
    #: where the state_dict goes
    weights: Path
    #: the config's ``data:`` file, where the held-out (and training) rows go; None without one
    data_file: Path | None = None

    def build_model(self) -> nn.Module:
        """A fresh instance of the model class with the config's kwargs (seed torch first for the same weights)."""
        return build_module(self.model_file, self.model_class, self.model_kwargs)

    def save(self, model: nn.Module, metrics: Mapping[str, float] | None = None) -> Path:
        """Write the model's ``state_dict`` to ``weights`` (the same weights give the same bytes) and the
        metrics to ``<weights>.metrics.json``."""
        self.weights.parent.mkdir(parents=True, exist_ok=True)
        # Through a buffer: torch.save names the zip's root folder after the file,
        # so the same weights would otherwise differ by file name.
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        self.weights.write_bytes(buffer.getvalue())
        metrics_path(self.weights).write_text(json.dumps(dict(metrics or {}), indent=2) + "\n")
        return self.weights

    def save_data(self, x_test: torch.Tensor | Mapping[str, torch.Tensor], y_test: torch.Tensor, x_train: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
                  y_train: torch.Tensor | None = None) -> Path:
        """Write the split to the config's ``data:`` file, as ``data: {file: ...}`` reads it."""
        if self.data_file is None:
            raise ArchiverError(f"{self.name}: the hook saves data, but the config has no data: section to say where")
        split = {"x_test": x_test, "y_test": y_test, **({"x_train": x_train, "y_train": y_train} if x_train is not None else {})}
        self.data_file.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(split, buffer)
        self.data_file.write_bytes(buffer.getvalue())
        return self.data_file


@dataclass(frozen=True)
class TrainingHook:
    """A resolved ``training:`` section: the function, where it comes from, and its validated options."""

    named: Named
    options: Any

    @property
    def function(self) -> Callable[..., Any]:
        return self.named.obj

    @property
    def path(self) -> Path | None:
        return self.named.path

    def run(self, job: TrainingJob) -> dict[str, float]:
        takes_options = len(inspect.signature(self.function).parameters) >= 2
        metrics = self.function(job, self.options) if takes_options else self.function(job)
        if metrics is not None and not isinstance(metrics, Mapping):
            raise ArchiverError(f"{job.name}: training hook {self.named.written!r} returned {type(metrics).__name__}, expected a dict of metrics (or None)")
        return dict(metrics or {})


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced: the weights file and its held-out metrics."""

    weights: Path
    metrics: dict[str, float]


def metrics_path(weights: Path) -> Path:
    """Where a model's held-out metrics are recorded, next to its weights."""
    return weights.with_suffix(".metrics.json")


def resolve_hook(raw: Any, root: Path) -> TrainingHook:
    """A config's ``training:`` section, resolved and its options validated.

    Raises:
        ConfigError: no recipe, a recipe of 0.2 (with the form that replaced it), options that do not fit.
        ArchiverError: the file or function cannot be imported.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(f"training must be a mapping, got {type(raw).__name__}")
    recipe = raw.get("recipe")
    if recipe in _MOVED:
        raise ConfigError(f"training.recipe {recipe!r} was a recipe built into serveready 0.2; training code now lives in your "
                          f"folder and the config names it: training: {{recipe: train.py:fit, ...}} (this repo's: {_MOVED[recipe]}; "
                          "see CHANGELOG.md)")
    if not isinstance(recipe, str) or not recipe.strip() or (":" not in recipe and not recipe.endswith(".py")):
        raise ConfigError(f"training.recipe must name a function in your folder, e.g. train.py:fit or package.module:fit, got {recipe!r}")
    named = import_named(recipe, root, "training.recipe", _pick_function, shipped=False)
    values = {k: v for k, v in raw.items() if k != "recipe"}
    return TrainingHook(named, _options(named, values))


def _pick_function(module: Any, name: str, written: str) -> tuple[str, Any]:
    name = name or "fit"
    function = getattr(module, name, None)
    if not callable(function) or isinstance(function, type):
        raise ArchiverError(f"training.recipe {written!r}: no function {name!r} there")
    parameters = list(inspect.signature(function).parameters)
    if not 1 <= len(parameters) <= 2:
        raise ArchiverError(f"training.recipe {written!r}: {name} must take (job) or (job, options), it takes ({', '.join(parameters)})")
    return name, function


def _options(named: Named, values: dict[str, Any]) -> Any:
    parameters = list(inspect.signature(named.obj).parameters)
    if len(parameters) < 2:
        if values:
            raise ConfigError(f"training.{sorted(values)[0]} is not a known key: {named.written} takes no options")
        return None
    try:
        hint = typing.get_type_hints(named.obj).get(parameters[1])
    except Exception:  # an annotation that cannot be evaluated: take the mapping as it is
        hint = None
    if hint is not None and dataclasses.is_dataclass(hint):
        return parse(hint, values, "training")
    return dict(values)


def is_stale(spec: ModelSpec) -> bool:
    """True when there is something to (re)make: weights missing, or older than anything they come from
    (the config by its content beyond :data:`SERVING_ONLY`, see :func:`config_digest`).

    A model without a ``training:`` hook is never stale: its weights are the user's. A hook-trained
    model whose ``data:`` file or one of whose ``extra_files`` is missing is (the hook writes them: the
    sentiment example's tokenizer). A missing input counts as newer, so the run that follows names it.
    """
    if spec.base is None and spec.training is None:
        return False
    if not spec.weights.exists():
        return True
    if spec.base is None and spec.data_file is not None and not spec.data_file.path.exists():
        return True  # the hook writes the data file too: the report and the variants need it
    if spec.base is None and not all(p.exists() for p in spec.extra_files):
        return True  # files the hook makes beside the weights (a tokenizer)
    built = spec.weights.stat().st_mtime
    sources = [spec.model_file, *made_by(spec)]
    configs = [(spec.source, spec.weights)]
    if spec.base is not None:
        sources.append(spec.base.weights)
        configs.append((spec.base.source, spec.base.weights))
    return (any(not p.exists() or p.stat().st_mtime > built for p in sources)
            or any(_config_moved(config, weights, built) for config, weights in configs)
            or (spec.base is not None and is_stale(spec.base)))


def _config_moved(config: Path, weights: Path, built: float) -> bool:
    """The config changed since ``built`` in what makes the weights, by the digest :func:`train` recorded."""
    if not config.exists():
        return True
    if config.stat().st_mtime <= built:
        return False
    recorded = config_digest_path(weights)
    return not recorded.is_file() or recorded.read_text().strip() != config_digest(config)


#: what ``ts-archive tune`` writes into a config, which no training or variant reads: a retuned config
#: must not retrain its model (a user's may train for hours)
SERVING_ONLY = ("serve", "handler.torch_threads")


def config_digest(config: Path) -> str:
    """A digest of ``config`` without :data:`SERVING_ONLY` and comments; "" when it cannot be read (stale, so
    the run that follows names the error)."""
    try:
        raw = yaml.safe_load(config.read_text())
    except (OSError, yaml.YAMLError):
        return ""
    if not isinstance(raw, dict):
        return ""
    for dotted in SERVING_ONLY:
        *parents, key = dotted.split(".")
        section: Any = raw
        for name in parents:
            section = section.get(name) if isinstance(section, dict) else None
        if isinstance(section, dict):
            section.pop(key, None)
    return hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()


def config_digest_path(weights: Path) -> Path:
    """Where :func:`train` records the digest of the config that made ``weights``, next to them."""
    return weights.with_suffix(".config.sha256")


def _record_config(spec: ModelSpec) -> None:
    config_digest_path(spec.weights).write_text(config_digest(spec.source) + "\n")


def made_by(spec: ModelSpec) -> list[Path]:
    """The code that writes this spec's weights: retraining follows when it changes."""
    if spec.base is not None:
        from . import variants

        return [Path(variants.__file__)]
    if spec.training is not None:
        path = spec.training.path
        if path is not None:
            return list(path.rglob("*.py")) if path.is_dir() else [path]
    return []


def job_for(spec: ModelSpec) -> TrainingJob:
    """The job a training hook is handed for ``spec``."""
    root = spec.source.parent.parent
    data = spec.data_file.path if spec.data_file is not None else None
    return TrainingJob(spec.name, root, spec.model_file, spec.model_class, dict(spec.model_kwargs), spec.sample_shape, spec.weights, data)


def train(spec: ModelSpec) -> TrainResult:
    """Train ``spec`` with its hook and save ``state_dict`` only; a variant is derived from its base."""
    if spec.base is not None:
        from .variants import derive

        result = TrainResult(derive(spec), {})
        _record_config(spec)
        return result
    if spec.training is None:
        raise ArchiverError(f"{spec.name}: {spec.source.name} has no training: section; its weights ({spec.weights}) come from you")
    job = job_for(spec)
    metrics = spec.training.run(job)
    if not spec.weights.is_file():
        raise ArchiverError(f"{spec.name}: training hook {spec.training.named.written!r} wrote no weights to {spec.weights}: call job.save(model, metrics)")
    sys.stderr.flush()
    _record_config(spec)
    return TrainResult(spec.weights, metrics)
