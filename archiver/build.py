"""Verify a model, pack it into a self-contained ``.mar``, and measure what was packed.

The archive carries the weights (a state_dict, an ONNX file or a torch.export
program), the model file where one is needed, a ``model-config.yaml`` and a
copy of the ``handlers`` package, so a TorchServe host needs torch (and
onnxruntime for ONNX archives), nothing of this library, to serve it. Before an
archive reaches the store it is unpacked and loaded by the handler's own
loader, run on the held-out data, and held to its config's fidelity bounds.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml
from model_archiver.model_archiver_config import ModelArchiverConfig
from model_archiver.model_archiver_error import ModelArchiverError
from model_archiver.model_packaging import package_model
from model_archiver.model_packaging_utils import ModelExportUtils
from torch import nn

import handlers
from archiver import evaluate
from archiver.errors import ArchiverError
from archiver.report import write_report
from archiver.spec import ModelSpec
from archiver.variants import FORMATS
from handlers.errors import ModelLoadError
from handlers.loaders import load_model
from handlers.runtime import load_eager_model

HANDLERS_DIR = Path(handlers.__file__).parent
#: Formats whose archive needs the Python model file.
_NEEDS_MODEL_FILE = {"eager", "int8_dynamic", "int8_static", "half"}


def verify(spec: ModelSpec) -> nn.Module:
    """Load a trained model's weights strictly into its class and run one forward on a sample input.

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
    _check_sample(spec, model)
    return model


def _check_sample(spec: ModelSpec, model: Any) -> None:
    try:
        with torch.inference_mode():
            out = model(torch.zeros(spec.sample_shape))
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


def model_config(spec: ModelSpec) -> dict[str, Any]:
    """The archive's ``model-config.yaml``: TorchServe's keys plus the handler's options."""
    handler = dict(spec.handler_options)
    handler.update(
        model_class=spec.model_class,
        model_kwargs=dict(spec.model_kwargs),
        format=FORMATS[spec.kind],
        sample_shape=list(spec.sample_shape),
    )
    if spec.kind == "half":
        handler["dtype"] = str(spec.variant.get("dtype"))
    return {**dict(spec.serve), "handler": handler}


def pack(spec: ModelSpec, store: Path) -> Path:
    """Write ``store/<name>.mar`` with torch-model-archiver's Python API; no checks."""
    fmt = FORMATS.get(spec.kind)
    if fmt is None:
        raise ArchiverError(f"{spec.source.name}: variant.kind {spec.kind!r} is not one of {sorted(FORMATS)}")
    for path in (spec.model_file, spec.handler_entry, spec.weights, *spec.extra_files):
        if not path.exists():
            hint = " (run `make train` first)" if path == spec.weights else ""
            raise ArchiverError(f"{spec.name}: {path} does not exist (named in {spec.source.name}){hint}")
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
            model_file=str(spec.model_file) if fmt in _NEEDS_MODEL_FILE else None,
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


def load_archive(archive: Path, into: Path) -> Any:
    """Unpack an archive and load its model with the handler's own loader, as a worker would."""
    with zipfile.ZipFile(archive) as mar:
        mar.extractall(into)
    manifest = json.loads((into / "MAR-INF" / "MANIFEST.json").read_text())
    options = (yaml.safe_load((into / "model-config.yaml").read_text()) or {}).get("handler", {})
    return load_model(into, manifest, options, torch.device("cpu"))


def measure(spec: ModelSpec, model: Any, archive: Path) -> tuple[dict[str, Any], dict[str, float]]:
    """The report's row (size, parameters, held-out quality, fidelity to fp32, latency) and fp32's quality."""
    data = evaluate.heldout(spec)
    outputs = evaluate.run(model, data.x_test)
    reference = evaluate.run(verify(spec.origin), data.x_test)
    served = evaluate.served_numbers(outputs, data.task)
    diff = (served - evaluate.served_numbers(reference, data.task)).abs()
    params, nonzero = evaluate.count_parameters(spec.weights)
    threads = torch.get_num_threads()
    torch.set_num_threads(int(spec.handler_options.get("torch_threads") or 1))  # as a worker runs it
    try:
        one, many = (evaluate.latency_ms(model, data.x_test[:1], n) for n in (1, 64))
    finally:
        torch.set_num_threads(threads)
    row = {
        "name": spec.name,
        "base": spec.origin.name,
        "kind": spec.kind if spec.kind != "half" else str(spec.variant.get("dtype")),
        "format": FORMATS[spec.kind],
        "archive_bytes": archive.stat().st_size,
        "weights_bytes": spec.weights.stat().st_size,
        "parameters": params,
        "nonzero_parameters": nonzero,
        **evaluate.quality(outputs, data),
        "max_abs_diff": diff.max().item(),
        "mean_abs_diff": diff.mean().item(),
        "latency_ms_1_row": one,
        "latency_ms_64_rows": many,
    }
    return row, evaluate.quality(reference, data)


def build(spec: ModelSpec, store: Path) -> Path:
    """Verify ``spec`` and write ``store/<name>.mar``; returns its path."""
    return build_measured(spec, store)[0]


def build_measured(spec: ModelSpec, store: Path) -> tuple[Path, dict[str, Any]]:
    """Build in a scratch folder, load it as a worker would, measure, enforce fidelity, then publish."""
    if spec.base is None:
        verify(spec)
    store = Path(store).resolve()
    store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"check-{spec.name}-") as tmp:
        scratch = Path(tmp)
        (scratch / "store").mkdir()
        archive = pack(spec, scratch / "store")
        try:
            model = load_archive(archive, scratch / "unpacked")
        except ModelLoadError as err:
            raise ArchiverError(f"{spec.name}: the packed archive does not load: {err.message}") from err
        _check_sample(spec, model)
        row, reference = measure(spec, model, archive)
        evaluate.check_fidelity(spec, row, reference)
        target = store / spec.archive_name
        shutil.move(str(archive), target)
    return target, row


def is_built(spec: ModelSpec, store: Path) -> bool:
    """True when ``store`` has the spec's archive, newer than everything it was made from (code included)."""
    archive = Path(store) / spec.archive_name
    if not archive.exists():
        return False
    inputs = [spec.source, spec.weights, spec.model_file, spec.handler_entry, *spec.extra_files]
    inputs += [*HANDLERS_DIR.glob("*.py"), *Path(__file__).parent.glob("*.py")]
    if spec.base is not None:
        inputs.append(spec.base.source)
    built = archive.stat().st_mtime
    return all(not p.exists() or p.stat().st_mtime <= built for p in inputs)


def build_all(specs: list[ModelSpec], store: Path, report_md: Path | None = None, if_stale: bool = False) -> list[Path]:
    """Build every spec (or only stale ones) with a progress line each, then update the fidelity report."""
    if if_stale:
        fresh = [s for s in specs if is_built(s, store)]
        if fresh:
            sys.stderr.write(f"up to date: {', '.join(s.name for s in fresh)}\n")
        specs = [s for s in specs if s not in fresh]
    built, rows = [], []
    for i, spec in enumerate(specs, 1):
        sys.stderr.write(f"[{i}/{len(specs)}] {spec.name}: verifying, packing, measuring ...")
        sys.stderr.flush()
        path, row = build_measured(spec, store)
        sys.stderr.write(f" {path.name} ({path.stat().st_size / 1024:.1f} KiB)\n")
        built.append(path)
        rows.append(row)
    if rows or not (Path(store) / "report.json").exists():
        write_report(rows, Path(store) / "report.json", report_md)
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
