"""``ts-archive init``: a commented starter config for a model in the user's own folder.

The starter names the model file, class and weights, the built-in handler for the
input kind with each of its options written out (commented, with its default and what
it does, taken from the options class itself), an optional ``data:`` section, and
TorchServe's ``serve:`` keys. It is checked by loading it as ``ts-archive build`` will.
"""

from __future__ import annotations

import dataclasses
import datetime
from enum import Enum
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from serveready.handlers import BUILTINS, builtin
from serveready.handlers.errors import ModelLoadError
from serveready.handlers.runtime import build_module

from .errors import ArchiverError
from .spec import load_spec

#: ``--input`` choices: the built-in handlers, by the kind of input they take.
INPUTS = {"tabular": "tabular", "image": "image_classifier", "text": "text_classifier", "audio": "audio_classifier"}
#: what ``model.sample_shape`` means, by handler
SHAPES = {"tabular": "[rows, features]", "image_classifier": "[batch, channels, height, width]", "text_classifier": "[batch, tokens]",
          "audio_classifier": "[batch, samples] (features: waveform) or [batch, n_mels, frames] (log_mel)"}
_COMMENT_COLUMN = 34


def init_config(
    name: str,
    model_file: Path,
    class_name: str,
    input_kind: str,
    configs: Path,
    sample_shape: tuple[int, ...] | None = None,
    kwargs: dict[str, Any] | None = None,
    weights: Path | None = None,
    data: Path | None = None,
    task: str | None = None,
    classes_file: Path | None = None,
    tokenizer: Path | None = None,
    force: bool = False,
) -> Path:
    """Write ``configs/<name>.yaml`` for a model in the folder above ``configs`` and check that it loads.

    Raises:
        ArchiverError: the file exists (without ``force``), the class cannot be built, the sample
            shape cannot be inferred, or the written config does not load.
    """
    if input_kind not in INPUTS:
        raise ArchiverError(f"--input must be one of {', '.join(INPUTS)}, got {input_kind!r}")
    configs = Path(configs).resolve()
    root = configs.parent
    target = configs / f"{name}.yaml"
    if target.exists() and not force:
        raise ArchiverError(f"{target} exists: edit it, or pass --force to overwrite it")
    model_path = _inside(Path(model_file), root, "--model-file")
    kwargs = dict(kwargs or {})
    if sample_shape:
        shape = tuple(sample_shape)
    else:
        shape = (2, 16) if input_kind == "text" else _infer_shape(root / model_path, class_name, kwargs, input_kind)
    if input_kind == "text":
        tokenizer = _inside(tokenizer, root, "--tokenizer") if tokenizer else Path("tokenizer.json")
    elif tokenizer is not None:
        raise ArchiverError("--tokenizer is for --input text")
    weights_path = _inside(weights, root, "--weights") if weights else Path("artifacts") / f"{name}.pt"
    text = render(
        name=name,
        model_file=model_path,
        class_name=class_name,
        kwargs=kwargs,
        sample_shape=shape,
        weights=weights_path,
        handler=INPUTS[input_kind],
        data=_inside(data, root, "--data") if data else None,
        task=task,
        classes_file=_inside(classes_file, root, "--classes-file") if classes_file else None,
        tokenizer=tokenizer,
    )
    configs.mkdir(parents=True, exist_ok=True)
    existed = target.read_text() if target.exists() else None
    target.write_text(text)
    try:
        load_spec(target)
    except ArchiverError:
        if existed is None:
            target.unlink()
        else:
            target.write_text(existed)
        raise
    return target


def render(
    *,
    name: str,
    model_file: Path,
    class_name: str,
    kwargs: dict[str, Any],
    sample_shape: tuple[int, ...],
    weights: Path,
    handler: str,
    data: Path | None,
    task: str | None,
    classes_file: Path | None,
    tokenizer: Path | None = None,
) -> str:
    """The starter config's text."""
    options = builtin(handler).options_type
    shape_doc = SHAPES[handler]
    lines = [
        f"# {name}: written by `ts-archive init` on {datetime.date.today().isoformat()}.",
        f"# `ts-archive build {name}` verifies, packs and measures it into model_store/{name}.mar.",
        "# Paths are relative to the folder that holds model_configs/.",
        f"name: {name}",
        _line('version: "1.0"', "TorchServe's model version: raise it to `ts-manage rollout` a retrained model"),
        "",
        "model:",
        _line(f"  file: {model_file.as_posix()}", "shipped in the archive: import only torch and the standard library"),
        _line(f"  class: {class_name}", "a torch.nn.Module subclass in that file"),
        _line(f"  kwargs: {_flow(kwargs)}", f"keyword arguments of {class_name}(...)"),
        _line(f"  sample_shape: {list(sample_shape)}", f"build-time check: one forward on zeros, {shape_doc}"),
        "",
        _line(f"weights: {weights.as_posix()}", "the state_dict: torch.save(model.state_dict(), path)"),
    ]
    extra = [p for p in (tokenizer, classes_file) if p is not None]
    if extra:
        lines.append(_line(f"extra_files: [{', '.join(p.as_posix() for p in extra)}]", "travel in the archive"))
    lines += ["", "handler:", _line(f"  entry: {handler}", f"built-in: {' | '.join(BUILTINS)}; or my_handler.py, or package.module:Class")]
    given = {"classes_file": classes_file.name} if classes_file is not None else {}
    if tokenizer is not None:
        given["tokenizer"] = tokenizer.name
    defaults = {**_defaults(options), **_examples(handler, sample_shape)}
    for spec in dataclasses.fields(options):
        doc = str(spec.metadata.get("doc", ""))
        if spec.name in given:
            lines.append(_line(f"  {spec.name}: {_flow(given[spec.name])}", doc))
        elif spec.name == "torch_threads":
            lines.append(_line("  torch_threads: 1", "per worker: TorchServe never limits torch threads"))
        else:
            value = defaults.get(spec.name)
            lines.append(_line(f"  # {spec.name}: {_flow(value) if value is not None else ''}".rstrip(), doc))
    lines += [""]
    if data is not None:
        lines += [
            "data:",
            _line(f"  file: {data.as_posix()}", 'torch.save({"x_test": ..., "y_test": ..., "x_train": ..., "y_train": ...})'),
            _line(f"  task: {task or 'classification'}", "classification (y: class indices) or regression"),
        ]
    else:
        lines += [
            "# data:                           # held-out data: quality in the report, fidelity bounds for variants",
            f"#   file: data/{name}.pt",
            "#   task: classification",
        ]
    lines += [
        "",
        "serve:                            # TorchServe's model-config keys, copied into the archive",
        "  minWorkers: 1",
        "  maxWorkers: 1",
        _line("  batchSize: 2", "with maxBatchDelay 0: pairs what is already queued, never waits"),
        _line("  maxBatchDelay: 0", "`ts-archive tune NAME` measures better settings on your machine"),
        "  responseTimeout: 30",
        _line("  deviceType: cpu", "or gpu (ts-manage register --device also switches it)"),
        "",
    ]
    return "\n".join(lines)


def _defaults(options: type) -> dict[str, Any]:
    """Each option's default as YAML writes it (enums as values, tuples as lists); required options have none."""
    present = {f.name: f.default for f in dataclasses.fields(options) if f.default is not dataclasses.MISSING and f.default is not None}
    return {k: v.value if isinstance(v, Enum) else list(v) if isinstance(v, tuple) else v for k, v in present.items()}


def _examples(handler: str, sample_shape: tuple[int, ...]) -> dict[str, Any]:
    """Values to show, commented out, where an option has no default: torchvision's ImageNet pipeline, scaled."""
    if handler != "image_classifier" or len(sample_shape) != 4:
        return {}
    channels, height, width = sample_shape[1:]
    imagenet = channels == 3
    return {
        "resize": [round(min(height, width) * 256 / 224)],
        "crop": [height, width],
        "mean": [0.485, 0.456, 0.406] if imagenet else [0.5],
        "std": [0.229, 0.224, 0.225] if imagenet else [0.5],
    }


def _infer_shape(model_file: Path, class_name: str, kwargs: dict[str, Any], input_kind: str) -> tuple[int, ...]:
    """[2, in_features] of a tabular model's first Linear layer; images need --sample-shape."""
    try:
        model = build_module(model_file, class_name, kwargs)
    except ModelLoadError as err:
        raise ArchiverError(f"{err.message} (pass the class's arguments with --kwarg name=value)") from None
    first = next((m for m in model.modules() if isinstance(m, nn.Linear)), None)
    if input_kind != "tabular" or first is None:
        raise ArchiverError(f"cannot tell {class_name}'s input shape: pass --sample-shape, e.g. --sample-shape 2 3 224 224")
    return (2, first.in_features)


def _inside(path: Path, root: Path, flag: str) -> Path:
    resolved = (Path.cwd() / path).resolve() if not path.is_absolute() else path.resolve()
    try:
        return resolved.relative_to(root)
    except ValueError:
        raise ArchiverError(f"{flag} {path} is outside {root}: configs name files relative to the folder that holds model_configs/") from None


def _flow(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def _line(text: str, comment: str) -> str:
    if not comment:
        return text
    return f"{text.ljust(_COMMENT_COLUMN - 1)} # {comment}" if len(text) < _COMMENT_COLUMN - 1 else f"{text}  # {comment}"


def parse_kwargs(pairs: list[str]) -> dict[str, Any]:
    """``name=value`` pairs, each value read as YAML (``hidden=32`` gives an int)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise ArchiverError(f"--kwarg {pair!r} must be name=value, e.g. hidden=32")
        out[key] = yaml.safe_load(value)
    return out

