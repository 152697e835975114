"""verify -> pack -> load -> publish: a model config becomes a checked, self-contained ``.mar``.

The archive carries the weights (a state_dict, an ONNX file or a torch.export
program), the model file where the format needs one, a ``model-config.yaml``, a copy
of ``serveready.handlers``, any handler code of the user's, and a generated entry
module, so a TorchServe host needs torch and Pillow (and onnxruntime for ONNX
archives), nothing of this library, to serve it. Before an archive reaches the store
it is unpacked and loaded by the handler's own loader, run on a sample, measured
(:mod:`evaluate`) and held to its config's fidelity bounds; only then is it moved in.
Nothing is written outside the store: a variant whose weights are missing or stale is
derived into the build's scratch folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, MutableMapping
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

import serveready
from serveready.handlers.archive import CONFIG_ENTRY, ENTRY_FILE, LIBRARY_DIR, LIBRARY_KEY, REGISTER_KEY, RESERVED_NAMES, Archive, normalize
from serveready.handlers.config import to_mapping
from serveready.handlers.engine import Engine, ModelSource
from serveready.handlers.errors import ArchiveError, ConfigError, ModelLoadError
from serveready.handlers.inputs import logits
from serveready.handlers.runtime import load_eager_model

from . import evaluate
from .entries import HANDLERS_DIR, check_top_level_name
from .errors import ArchiverError
from .report import write_report
from .spec import ModelSpec
from .training import is_stale
from .variants import derive

Model = evaluate.Model
#: The library's own code: an archive built before it changed is stale.
LIBRARY_CODE = [*HANDLERS_DIR.glob("*.py"), *Path(__file__).parent.glob("*.py"), Path(serveready.__file__)]


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
        raise ArchiverError(f"{spec.name}: {err.message}{_train_hint(spec)}") from err
    check_sample(spec, model)
    return model


def check_sample(spec: ModelSpec, model: Model) -> torch.Tensor:
    """One forward on the handler's sample inputs (zeros of ``sample_shape``): one finite output row per
    input row, or an ArchiverError."""
    try:
        with torch.inference_mode():
            out = model(*spec.sample_inputs.values())
        out = logits(out)
    except Exception as err:
        raise ArchiverError(
            f"{spec.name}: {spec.model_class} from {spec.model_file.name} with {spec.weights.name} "
            f"fails on a sample input of shape {list(spec.sample_shape)}: {err}"
        ) from err
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != spec.sample_shape[0]:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ArchiverError(f"{spec.name}: a sample of {spec.sample_shape[0]} rows gave output {shape}, expected one output row per input row ([rows, outputs])")
    if not torch.isfinite(out).all():
        raise ArchiverError(f"{spec.name}: {spec.weights.name} gives non-finite outputs on a zero input")
    return out


def model_config(spec: ModelSpec) -> dict[str, Any]:
    """The archive's ``model-config.yaml``: TorchServe's keys plus the handler's options and how to load the model.

    TorchServe 0.12 reads ``maxBatchDelay: 0`` in an archive as "not set" and uses its default,
    100 ms: a lone client would wait 100 ms. So "batch only what is queued" (``batchSize`` > 1,
    delay 0) is written as ``batchSize: 1`` for a plain TorchServe (no wait either) plus a
    ``register:`` section that ``ts-manage register`` passes explicitly, where 0 is honoured.
    ``serveready:`` says which library version built it and which handler class serves it
    (``serveready.load`` reads it).
    """
    serve = to_mapping(spec.serve)
    extra: dict[str, Any] = {}
    if serve.get("maxBatchDelay") == 0 and (serve.get("batchSize") or 1) > 1:
        extra[REGISTER_KEY] = {"batchSize": serve["batchSize"], "maxBatchDelay": 0}
        serve["batchSize"] = 1
        del serve["maxBatchDelay"]
    library = {"version": serveready.__version__, "handler": spec.handler.qualified}
    return {**serve, **extra, "handler": to_mapping(spec.handler_options), "model": to_mapping(spec.model_options), LIBRARY_KEY: library}


def pack(spec: ModelSpec, store: Path) -> Path:
    """Write ``store/<name>.mar`` with torch-model-archiver's Python API; no checks of the model."""
    kind = spec.kind_info
    shipped = [(spec.weights, spec.weights.name)] + ([(spec.model_file, spec.model_file.name)] if kind.ships_model_file else [])
    shipped += list(spec.handler.files) + [(p, p.name) for p in spec.extra_files]
    for path, _ in shipped:
        if not path.exists():
            raise ArchiverError(f"{spec.name}: {path} does not exist (named in {spec.source.name}){_train_hint(spec) if path == spec.weights else ''}")
    _check_archive_names(spec, [name for _, name in shipped])
    with tempfile.TemporaryDirectory(prefix=f"mar-{spec.name}-") as tmp:
        work = Path(tmp)
        extra = work / "extra"
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        shutil.copytree(HANDLERS_DIR, extra / LIBRARY_DIR / "handlers", ignore=ignore)
        shutil.copy2(serveready.__file__, extra / LIBRARY_DIR / "__init__.py")
        for path, name in [*spec.handler.files, *[(p, p.name) for p in spec.extra_files]]:
            if path.is_dir():
                shutil.copytree(path, extra / name, ignore=ignore)
            else:
                shutil.copy2(path, extra / name)
        entry = work / ENTRY_FILE
        entry.write_text(spec.handler.entry_source())
        # TorchServe pip-installs an archive's requirements.txt only with install_py_dep_per_model=true;
        # elsewhere it tells the host what to install (and the worker names it when missing).
        requirements = spec.handler.handler_class.requirements
        requirements_file = work / "requirements.txt"
        if requirements:
            requirements_file.write_text("".join(f"{line}\n" for line in requirements))
        config_file = work / CONFIG_ENTRY
        header = f"# written by serveready {serveready.__version__} from {spec.source.name}: TorchServe's keys, then the handler's\n"
        config_file.write_text(header + yaml.safe_dump(model_config(spec), sort_keys=False))
        config = ModelArchiverConfig(
            model_name=spec.name,
            handler=str(entry),
            version=spec.version,
            serialized_file=str(spec.weights),
            model_file=str(spec.model_file) if kind.ships_model_file else None,
            extra_files=str(extra),
            export_path=str(store),
            force=True,
            config_file=str(config_file),
            requirements_file=str(requirements_file) if requirements else None,
        )
        (store / spec.archive_name).unlink(missing_ok=True)
        with _archiver_tempdir(work / "pack"):
            try:
                package_model(config, ModelExportUtils.generate_manifest_json(config))
            except (ModelArchiverError, OSError, ValueError) as err:
                raise ArchiverError(f"{spec.name}: torch-model-archiver failed: {err}") from err
    normalize(store / spec.archive_name)
    return store / spec.archive_name


def load_packed(archive: Path, into: Path, device: torch.device | None = None) -> Engine:
    """Unpack an archive and initialize it as a worker would (options checked, model loaded and run on its
    sample, handler set up), on the CPU unless ``device`` says otherwise, leaving torch's threads alone."""
    Archive(archive).unpack(into)
    manifest = json.loads((into / "MAR-INF" / "MANIFEST.json").read_text())
    config = Archive(archive).config
    from serveready.handlers.host import handler_class_of

    gpu = device.index or 0 if device is not None and device.type == "cuda" else None
    return Engine(handler_class_of(into, config), ModelSource(into, manifest, config, name=archive.stem, gpu_id=gpu, threads=0))


def build(spec: ModelSpec, store: Path) -> Path:
    """Verify ``spec`` and write ``store/<name>.mar``; returns its path."""
    return build_measured(spec, store)[0]


def build_measured(spec: ModelSpec, store: Path, references: MutableMapping[str, Model] | None = None) -> tuple[Path, dict[str, Any]]:
    """Pack in a scratch folder, load it as a worker would, measure, enforce fidelity, then publish.

    Args:
        spec: the model to build.
        store: where the archive goes (created if missing).
        references: fp32 models by name, shared between builds so each is loaded once.
    """
    references = {} if references is None else references
    store = Path(store).resolve()
    store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"build-{spec.name}-") as tmp:
        scratch = Path(tmp)
        spec = dataclasses.replace(spec, weights=_weights(spec, scratch))
        (scratch / "store").mkdir()
        archive = pack(spec, scratch / "store")
        try:
            model = load_packed(archive, scratch / "unpacked").model
            check_sample(spec, model)
        except (ConfigError, ModelLoadError, ArchiveError) as err:
            raise ArchiverError(f"{spec.name}: {err.message}{_train_hint(spec)}") from err
        if spec.kind == "fp32":
            references[spec.name] = model
            reference = None
        else:
            if spec.origin.name not in references:  # not `or`: a model may define __len__ and be falsy
                references[spec.origin.name] = verify(spec.origin)
            reference = references[spec.origin.name]
        row, reference_quality = evaluate.measure(spec, model, archive, spec.weights, reference)
        evaluate.check_fidelity(spec, row, reference_quality)
        target = store / spec.archive_name
        partial = store / f".{spec.archive_name}.partial"
        shutil.copyfile(archive, partial)
        os.replace(partial, target)  # the store never holds half an archive
    return target, row


def _weights(spec: ModelSpec, scratch: Path) -> Path:
    """The weights to pack: the config's file, or a variant derived afresh into ``scratch``."""
    if spec.base is None or (spec.weights.exists() and not is_stale(spec)):
        return spec.weights
    derived = dataclasses.replace(spec, weights=scratch / "derived" / spec.weights.name)
    return derive(derived)


def inputs(spec: ModelSpec) -> list[Path]:
    """Every file an archive is made from: config, model, weights (or its base's), handler and extra files, data, our code."""
    paths = [spec.source, spec.model_file, *spec.extra_files, *LIBRARY_CODE]
    for path, _ in spec.handler.files:
        paths += list(path.rglob("*.py")) if path.is_dir() else [path]
    if spec.data is not None:
        paths.append(spec.data.path)
    if spec.base is not None:
        paths += [spec.base.source, spec.base.weights] + ([spec.weights] if spec.weights.exists() else [])
    else:
        paths.append(spec.weights)
    return paths


def is_built(spec: ModelSpec, store: Path) -> bool:
    """True when ``store`` has the spec's archive, newer than everything it is made from and passing its
    integrity check (archives from before SHA256SUMS get rebuilt); a missing input means rebuild."""
    archive = Path(store) / spec.archive_name
    if not archive.exists():
        return False
    built = archive.stat().st_mtime
    return all(p.exists() and p.stat().st_mtime <= built for p in inputs(spec)) and not Archive(archive).problems()


def build_all(specs: list[ModelSpec], store: Path, report_md: Path | None = None, if_stale: bool = False) -> list[Path]:
    """Build every spec (or only stale ones) with a progress line each, then update the report.

    The report goes to ``store/report.json`` and ``report_md`` (default ``store/report.md``).
    """
    store = Path(store)
    if if_stale:
        fresh = [s for s in specs if is_built(s, store)]
        if fresh:
            sys.stderr.write(f"up to date: {', '.join(s.name for s in fresh)}\n")
        specs = [s for s in specs if s not in fresh]
    built, rows = [], []
    references: dict[str, Model] = {}
    try:
        for i, spec in enumerate(specs, 1):
            sys.stderr.write(f"[{i}/{len(specs)}] {spec.name}: {'deriving, ' if spec.base else ''}packing, loading, measuring ...")
            sys.stderr.flush()
            path, row = build_measured(spec, store, references)
            sys.stderr.write(f" {path.name} ({path.stat().st_size / 1024:.1f} KiB)\n")
            built.append(path)
            rows.append(row)
    finally:  # what was published is reported, even when a later model fails
        if rows or (store.is_dir() and not (store / "report.json").exists()):
            write_report(rows, store / "report.json", report_md or store / "report.md")
    return built


def _check_archive_names(spec: ModelSpec, names: list[str]) -> None:
    taken = set(RESERVED_NAMES)
    for name in names:
        if name in taken:
            raise ArchiverError(f"{spec.name}: two files would be {name!r} in the archive: rename one")
        taken.add(name)
        stem, _, suffix = name.partition(".")
        if suffix in ("", "py"):
            check_top_level_name(stem, f"{name} (in {spec.source.name})")


def _train_hint(spec: ModelSpec) -> str:
    if spec.weights.exists():
        return ""
    if spec.training is not None:
        return f" (run `ts-archive train {spec.name}` first)"
    return f" (the weights of {spec.name} come from you: save its state_dict there)"


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
