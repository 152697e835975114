"""What every classifier answers with: class names (TorchServe's index_to_name JSON, a JSON list, or one
name per line), the k a request asks for, and the top k classes with their probabilities."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .errors import InvalidInput, ModelLoadError


def read_class_names(path: Path) -> list[str]:
    """The class names in ``path``, in class-index order.

    A ``.json`` file holds ``{"0": "cat", "1": "dog"}`` (TorchServe's index_to_name
    convention, indices 0..n-1) or ``["cat", "dog"]``; any other file holds one name
    per line (blank lines are skipped).

    Raises:
        ModelLoadError: the file is missing, unreadable, or not one of those shapes.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"class names file {Path(path).name} cannot be read: {err}") from err
    if Path(path).suffix.lower() != ".json":
        names = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        try:
            document = json.loads(text)
        except ValueError as err:
            raise ModelLoadError(f"class names file {Path(path).name} is not valid JSON: {err}") from err
        if isinstance(document, dict):
            try:
                names = [str(document[str(i)]) for i in range(len(document))]
            except KeyError as err:
                raise ModelLoadError(f"class names file {Path(path).name} must map every index 0..{len(document) - 1} to a name; {err} is missing") from None
        elif isinstance(document, list) and all(isinstance(n, (str, int)) for n in document):
            names = [str(n) for n in document]
        else:
            raise ModelLoadError(f"class names file {Path(path).name} must hold {{\"0\": name, ...}} or [names], got a JSON {type(document).__name__}")
    if not names:
        raise ModelLoadError(f"class names file {Path(path).name} names no classes")
    return names


def class_names(options: Any, model_dir: Path, classes: int) -> list[str]:
    """The archive's class names (``options.classes_file``; the indices when it has none), one per model output."""
    if options.classes_file is None:
        return [str(i) for i in range(classes)]
    names = read_class_names(model_dir / options.classes_file)
    if len(names) != classes:
        raise ModelLoadError(f"class names file {options.classes_file} names {len(names)} classes, the model has {classes} outputs")
    return names


def requested_k(value: Any, default: int, classes: int) -> int:
    """The k a request asks for (a JSON number, or a header's text), ``default`` when it asks none.

    Raises:
        InvalidInput: k is not a whole number from 1 to ``classes``.
    """
    if value is None:
        return min(default, classes)
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8", "replace")
    try:
        k = int(value)
    except (TypeError, ValueError):
        k = 0
    if isinstance(value, bool) or isinstance(value, float) or not 1 <= k <= classes:
        raise InvalidInput(f"k must be a whole number from 1 to {classes}, got {value!r}")
    return k


def top_classes(outputs: torch.Tensor, k: int, names: list[str]) -> list[list[dict[str, Any]]]:
    """Per output row, its ``k`` likeliest classes: ``{"class", "index", "probability"}``, likeliest first."""
    top = torch.topk(torch.softmax(outputs, dim=1), k, dim=1)
    return [[{"class": names[i], "index": i, "probability": p} for p, i in zip(values, indices, strict=True)]
            for values, indices in zip(top.values.tolist(), top.indices.tolist(), strict=True)]
