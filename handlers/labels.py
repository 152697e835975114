"""Class names for classifiers: TorchServe's index_to_name JSON, a JSON list, or one name per line."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ModelLoadError


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
