"""Verify a model against its weights, then pack it into a self-contained ``.mar``.

The archive carries the model file, the state_dict, a ``model-config.yaml``
and a copy of the ``handlers`` package, so a TorchServe host needs torch and
nothing of this library to serve it.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml
from model_archiver.model_archiver_config import ModelArchiverConfig
from model_archiver.model_archiver_error import ModelArchiverError
from model_archiver.model_packaging import package_model
from model_archiver.model_packaging_utils import ModelExportUtils
from torch import nn

import handlers
from archiver.errors import ArchiverError
from archiver.spec import ModelSpec
from handlers.errors import ModelLoadError
from handlers.runtime import load_eager_model

HANDLERS_DIR = Path(handlers.__file__).parent


def verify(spec: ModelSpec) -> nn.Module:
    """Load the weights strictly into the model class and run one forward on a sample input.

    A wrong weights file or shape fails here, naming the file and the mismatch,
    instead of later as a crash-looping TorchServe worker.

    Raises:
        ArchiverError: the weights do not fit, or the forward fails.
    """
    try:
        model = load_eager_model(spec.model_file, spec.model_class, spec.model_kwargs, spec.weights)
    except ModelLoadError as err:
        hint = " (run `make train` first)" if not spec.weights.exists() else ""
        raise ArchiverError(f"{spec.name}: {err.message}{hint}") from err
    sample = torch.zeros(spec.sample_shape)
    try:
        with torch.inference_mode():
            out = model(sample)
    except Exception as err:
        raise ArchiverError(
            f"{spec.name}: {spec.model_class} from {spec.model_file.name} with {spec.weights.name} "
            f"fails on a sample input of shape {list(spec.sample_shape)}: {err}"
        ) from err
    if not isinstance(out, torch.Tensor) or out.shape[0] != spec.sample_shape[0]:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ArchiverError(f"{spec.name}: sample of {spec.sample_shape[0]} rows gave output {shape}, expected one output row per input row")
    if not torch.isfinite(out).all():
        raise ArchiverError(f"{spec.name}: {spec.weights.name} gives non-finite outputs on a zero input")
    return model


def model_config(spec: ModelSpec) -> dict[str, Any]:
    """The archive's ``model-config.yaml``: TorchServe's keys plus the handler's options."""
    handler = dict(spec.handler_options)
    handler.update(model_class=spec.model_class, model_kwargs=dict(spec.model_kwargs))
    return {**dict(spec.serve), "handler": handler}


def build(spec: ModelSpec, store: Path) -> Path:
    """Verify ``spec`` and write ``store/<name>.mar``; returns its path."""
    verify(spec)
    for path in (spec.model_file, spec.handler_entry, *spec.extra_files):
        if not path.exists():
            raise ArchiverError(f"{spec.name}: {path} does not exist (named in {spec.source.name})")
    store = Path(store).resolve()
    store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"mar-{spec.name}-") as tmp:
        work = Path(tmp)
        extra = work / "extra"
        shutil.copytree(HANDLERS_DIR, extra / "handlers", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        for path in spec.extra_files:
            copy = shutil.copytree if path.is_dir() else shutil.copy2
            copy(path, extra / path.name)
        config_file = work / "model-config.yaml"
        config_file.write_text(yaml.safe_dump(model_config(spec), sort_keys=False))
        config = ModelArchiverConfig(
            model_name=spec.name,
            handler=str(spec.handler_entry),
            version=spec.version,
            serialized_file=str(spec.weights),
            model_file=str(spec.model_file),
            extra_files=str(extra),
            export_path=str(store),
            force=True,
            config_file=str(config_file),
        )
        (store / spec.archive_name).unlink(missing_ok=True)
        with _archiver_tempdir(work / "pack"):
            try:
                package_model(config, ModelExportUtils.generate_manifest_json(config))
            except (ModelArchiverError, OSError, ValueError) as err:
                raise ArchiverError(f"{spec.name}: torch-model-archiver failed: {err}") from err
    return store / spec.archive_name


def build_all(specs: list[ModelSpec], store: Path) -> list[Path]:
    """Build every spec, printing a progress line per archive."""
    built = []
    for i, spec in enumerate(specs, 1):
        sys.stderr.write(f"[{i}/{len(specs)}] {spec.name}: verifying and packing ...")
        sys.stderr.flush()
        path = build(spec, store)
        sys.stderr.write(f" {path} ({path.stat().st_size / 1024:.1f} KiB)\n")
        built.append(path)
    return built


@contextmanager
def _archiver_tempdir(path: Path) -> Iterator[None]:
    # model-archiver stages files in <tempdir>/<model name>; give it a private one
    # so two builds of the same name never share (or delete) a folder.
    path.mkdir()
    saved = tempfile.tempdir
    tempfile.tempdir = str(path)
    try:
        yield
    finally:
        tempfile.tempdir = saved
