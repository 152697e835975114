"""Held-out (and training) data a config names: ``data: {file: ..., task: ...}``, loaded once per process.

    DataFile    the user's own tensors, ``torch.save({"x_test": ..., "y_test": ..., "x_train": ..., "y_train": ...})``

``x_test`` and ``x_train`` are the model's inputs: one tensor, or for a model of several inputs a
dict of them by name in the forward's order (a text model's ``{"input_ids": ..., "attention_mask": ...}``).

A data file is written by whoever trains the model (the examples' ``train.py`` does it, as a
user's own training would); the archiver reads it for the report, fidelity bounds and the
variants that need data (static int8 calibration, distillation, fine-tuning), so they all see
the very same rows. The library itself ships no data set.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from serveready.handlers.inputs import Inputs, as_inputs, rows

from .errors import ArchiverError

Task = Literal["regression", "classification"]


@dataclass(frozen=True)
class Split:
    """Held-out inputs and truth, and (where the file has them) training rows."""

    task: Task
    x_test: Inputs
    y_test: torch.Tensor
    x_train: Inputs | None = None
    y_train: torch.Tensor | None = None

    def training_inputs(self, purpose: str) -> Inputs:
        """The training inputs, or an error saying ``purpose`` needs them."""
        if self.x_train is None:
            raise ArchiverError(f"{purpose} needs training inputs: add x_train (and y_train) to the data file")
        return self.x_train


@dataclass(frozen=True)
class DataFile:
    """A user's data file (``data: {file: ..., task: ...}``), loaded with ``weights_only=True``."""

    path: Path
    task: Task

    def split(self) -> Split:
        try:
            document = torch.load(self.path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise ArchiverError(f"data file {self.path} does not exist") from None
        except Exception as err:
            raise ArchiverError(f"data file {self.path.name} is not a torch.save'd dict of tensors: {err}") from err
        if not isinstance(document, dict) or not {"x_test", "y_test"} <= set(document):
            keys = sorted(document) if isinstance(document, dict) else type(document).__name__
            raise ArchiverError(f"data file {self.path.name} must hold a dict with x_test and y_test (and optionally x_train, y_train), got {keys}")
        tensors = {k: self._tensor(document, k) for k in ("x_test", "y_test", "x_train", "y_train") if k in document}
        for x, y in (("x_test", "y_test"), ("x_train", "y_train")):
            if (x in tensors) != (y in tensors):
                raise ArchiverError(f"data file {self.path.name} has {x if x in tensors else y} without {y if x in tensors else x}")
            if x in tensors and rows(tensors[x]) != len(tensors[y]):
                raise ArchiverError(f"data file {self.path.name}: {x} has {rows(tensors[x])} rows, {y} has {len(tensors[y])}")
        return Split(self.task, tensors["x_test"], tensors["y_test"], tensors.get("x_train"), tensors.get("y_train"))

    def _tensor(self, document: dict, key: str) -> torch.Tensor | Inputs:
        value = document[key]
        if key.startswith("x"):
            return self._inputs(value, key)
        if not isinstance(value, torch.Tensor) or value.ndim == 0 or len(value) == 0:
            raise ArchiverError(f"data file {self.path.name}: {key} must be a non-empty tensor, got {type(value).__name__}")
        if self.task == "classification":
            if value.is_floating_point() or value.ndim != 1:
                raise ArchiverError(f"data file {self.path.name}: {key} must hold class indices (a 1-D integer tensor) for classification")
            return value.long()
        return value.float().reshape(len(value), -1)

    def _inputs(self, value: object, key: str) -> Inputs:
        """A tensor, or a dict of tensors with the same rows: numbers as float32, integers (token ids) as int64."""
        parts = value if isinstance(value, dict) else {key: value}
        if not parts or not all(isinstance(t, torch.Tensor) and t.ndim > 0 and len(t) > 0 for t in parts.values()):
            raise ArchiverError(f"data file {self.path.name}: {key} must be a non-empty tensor, or a dict of them (a model's inputs by name)")
        if len({len(t) for t in parts.values()}) != 1:
            raise ArchiverError(f"data file {self.path.name}: the inputs of {key} ({', '.join(parts)}) have different numbers of rows")
        return as_inputs({k: t.float() if t.is_floating_point() else t.long() for k, t in parts.items()})


def load(source: DataFile) -> Split:
    """The split in ``source``, read once per process (again when the file changes)."""
    stamp = source.path.stat().st_mtime_ns if source.path.exists() else 0
    return _load(source, stamp)


@functools.lru_cache(maxsize=8)
def _load(source: DataFile, stamp: int) -> Split:
    return source.split()
