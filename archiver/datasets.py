"""Data sets: one room that training, variants and measurement share, each load cached.

    Regression  a seeded linear task ``y = x @ w + b + noise``, generated (a known ground truth)
    Digits      scikit-learn's 8x8 handwritten digits (they ship with scikit-learn: nothing is downloaded)
    DataFile    the user's own tensors, ``torch.save({"x_test": ..., "y_test": ..., "x_train": ..., "y_train": ...})``

A source is a frozen, hashable description of where the data comes from; :func:`load`
turns it into a :class:`Split` once per process, so training, calibration, distillation
and the report all see the very same rows.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from .errors import ArchiverError

Task = Literal["regression", "classification"]


@dataclass(frozen=True)
class Split:
    """Held-out inputs and truth, and (where the source has them) training rows."""

    task: Task
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_train: torch.Tensor | None = None
    y_train: torch.Tensor | None = None

    def training_inputs(self, purpose: str) -> torch.Tensor:
        """The training inputs, or an error saying ``purpose`` needs them."""
        if self.x_train is None:
            raise ArchiverError(f"{purpose} needs training inputs: add x_train (and y_train) to the data file")
        return self.x_train


@dataclass(frozen=True)
class RegressionSplit:
    """A linear regression task ``y = x @ w + b + noise`` split into train and held-out rows."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    weight: torch.Tensor
    bias: float


def make_regression(seed: int, samples: int, width: int, holdout: float, noise: float) -> RegressionSplit:
    """Generate the task from ``seed`` alone: the same seed gives the same tensors.

    Args:
        seed: seeds a private generator (the global RNG is left alone).
        samples: rows in total, split into train and held-out.
        width: features per row.
        holdout: the fraction of rows held out for evaluation.
        noise: standard deviation of the Gaussian noise on the target.
    """
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must be in (0, 1), got {holdout}")
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(width, 1, generator=gen)
    bias = float(torch.randn(1, generator=gen))
    x = torch.randn(samples, width, generator=gen)
    y = x @ weight + bias + noise * torch.randn(samples, 1, generator=gen)
    n_test = max(int(samples * holdout), 1)
    return RegressionSplit(x[n_test:], y[n_test:], x[:n_test], y[:n_test], weight, bias)


@dataclass(frozen=True)
class DigitsSplit:
    """scikit-learn's digits as (n, 1, 8, 8) float tensors in [0, 1], split stratified by class."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


#: The digits data set counts ink pixels per 4x4 block of a 32x32 bitmap: 0..16.
DIGITS_MAX = 16.0


def load_digits_split(seed: int, holdout: float) -> DigitsSplit:
    """The 1797 images that ship with scikit-learn (no download), split with ``seed``."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise ArchiverError("the digits data set ships with scikit-learn: pip install 'serveready[examples]' (or scikit-learn)") from None

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.images, digits.target, test_size=holdout, random_state=seed, stratify=digits.target
    )

    def images(a: object) -> torch.Tensor:
        return torch.tensor(a, dtype=torch.float32).unsqueeze(1) / DIGITS_MAX

    return DigitsSplit(images(x_train), torch.tensor(y_train), images(x_test), torch.tensor(y_test))


# -- sources -----------------------------------------------------------------


@dataclass(frozen=True)
class Regression:
    """The generated regression task of ``training: {recipe: regression}``."""

    seed: int
    samples: int
    width: int
    holdout: float
    noise: float

    def split(self) -> Split:
        data = make_regression(self.seed, self.samples, self.width, self.holdout, self.noise)
        return Split("regression", data.x_test, data.y_test, data.x_train, data.y_train)


@dataclass(frozen=True)
class Digits:
    """scikit-learn's digits, split as ``training: {recipe: digits}`` says."""

    seed: int
    holdout: float

    def split(self) -> Split:
        data = load_digits_split(self.seed, self.holdout)
        return Split("classification", data.x_test, data.y_test, data.x_train, data.y_train)


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
            if x in tensors and len(tensors[x]) != len(tensors[y]):
                raise ArchiverError(f"data file {self.path.name}: {x} has {len(tensors[x])} rows, {y} has {len(tensors[y])}")
        return Split(self.task, tensors["x_test"], tensors["y_test"], tensors.get("x_train"), tensors.get("y_train"))

    def _tensor(self, document: dict, key: str) -> torch.Tensor:
        value = document[key]
        if not isinstance(value, torch.Tensor) or value.ndim == 0 or len(value) == 0:
            raise ArchiverError(f"data file {self.path.name}: {key} must be a non-empty tensor, got {type(value).__name__}")
        if key.startswith("x"):
            return value.float()
        if self.task == "classification":
            if value.is_floating_point() or value.ndim != 1:
                raise ArchiverError(f"data file {self.path.name}: {key} must hold class indices (a 1-D integer tensor) for classification")
            return value.long()
        return value.float().reshape(len(value), -1)


Source = Regression | Digits | DataFile


def load(source: Source) -> Split:
    """The split ``source`` describes, made once per process (a data file again when it changes)."""
    stamp = source.path.stat().st_mtime_ns if isinstance(source, DataFile) and source.path.exists() else 0
    return _load(source, stamp)


@functools.lru_cache(maxsize=8)
def _load(source: Source, stamp: int) -> Split:
    return source.split()
