"""Training recipes: each turns a spec into a saved state_dict and its held-out score.

A recipe is named by a spec's ``training.recipe``; its entry in :data:`RECIPES` says
which options the ``training:`` section takes (a typed dataclass) and how to train.
Its data come from :mod:`datasets`, so variants are calibrated, distilled and measured
on the very split the model was trained and evaluated on.
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from serveready.handlers.config import option
from serveready.handlers.runtime import build_module

from . import datasets
from .errors import ArchiverError

if TYPE_CHECKING:
    from .spec import ModelSpec


@dataclass(frozen=True, kw_only=True)
class RegressionTraining:
    """``training: {recipe: regression}``: the article's loop on a generated linear task."""

    recipe: Literal["regression"] = "regression"
    seed: int = option(0, minimum=0, doc="seeds the data and the weights: the same seed gives the same file")
    samples: int = option(2000, minimum=2, doc="rows generated in all")
    holdout: float = option(0.2, minimum=0.01, maximum=0.99, doc="fraction of rows held out")
    noise: float = option(0.1, minimum=0, doc="standard deviation of the target's noise")
    epochs: int = option(300, minimum=1)
    lr: float = option(0.05, minimum=0)

    def source(self, spec: ModelSpec) -> datasets.Source:
        return datasets.Regression(self.seed, self.samples, spec.sample_shape[-1], self.holdout, self.noise)


@dataclass(frozen=True, kw_only=True)
class DigitsTraining:
    """``training: {recipe: digits}``: cross-entropy on scikit-learn's digits."""

    recipe: Literal["digits"] = "digits"
    seed: int = option(0, minimum=0)
    holdout: float = option(0.2, minimum=0.01, maximum=0.99)
    epochs: int = option(25, minimum=1)
    batch_size: int = option(64, minimum=1)
    lr: float = option(0.002, minimum=0)
    augment: bool = option(False, doc="also train on each digit re-made through the image path")

    def source(self, spec: ModelSpec) -> datasets.Source:
        return datasets.Digits(self.seed, self.holdout)


TrainingOptions = RegressionTraining | DigitsTraining


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced: the weights file and its held-out metrics."""

    weights: Path
    metrics: dict[str, float]


def metrics_path(spec: ModelSpec) -> Path:
    """Where a model's held-out metrics are recorded, next to its weights."""
    return spec.weights.with_suffix(".metrics.json")


@contextmanager
def _deterministic(seed: int) -> Iterator[None]:
    # One thread: float sums then run in one order, so a seed gives one weights file.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _progress(name: str, epoch: int, epochs: int, loss: float) -> None:
    if epoch % max(epochs // 10, 1) == 0 or epoch == epochs:
        sys.stderr.write(f"\r  {name}: epoch {epoch}/{epochs} train loss {loss:.5f}")
        if epoch == epochs:
            sys.stderr.write("\n")
        sys.stderr.flush()


def train_regression(spec: ModelSpec) -> TrainResult:
    """The article's training loop, with the targets it forgot to define."""
    cfg: RegressionTraining = spec.training  # type: ignore[assignment]
    data = datasets.load(cfg.source(spec))
    epochs = cfg.epochs
    with _deterministic(cfg.seed):
        model = build_module(spec.model_file, spec.model_class, spec.model_kwargs)
        criterion = nn.MSELoss()
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        inputs, targets = data.x_train, data.y_train
        model.train()
        for epoch in range(1, epochs + 1):
            optimizer.zero_grad()
            outputs = model(inputs)
            loss = criterion(outputs, targets)
            loss.backward()
            optimizer.step()
            _progress(spec.name, epoch, epochs, loss.item())
        model.eval()
        with torch.inference_mode():
            test_mse = criterion(model(data.x_test), data.y_test).item()
    metrics = {"heldout_mse": test_mse, "noise_floor_mse": cfg.noise**2, "train_rows": len(inputs), "heldout_rows": len(data.x_test)}
    return TrainResult(_save(spec, model, metrics), metrics)


def _remade_through_image_path(images: torch.Tensor) -> torch.Tensor:
    """Each 8x8 digit blown up to a 32x32 picture and converted back as served images are."""
    from PIL import Image

    from serveready.handlers.images import to_digit_grid

    def picture(image: torch.Tensor) -> Image.Image:
        pixels = (image[0].repeat_interleave(4, 0).repeat_interleave(4, 1) * 255).round().to(torch.uint8)
        return Image.fromarray(pixels.numpy(), "L")

    return torch.stack([to_digit_grid(picture(image)) for image in images]).unsqueeze(1)


def train_digits(spec: ModelSpec) -> TrainResult:
    """Cross-entropy on scikit-learn's digits, seeded mini-batches, held-out accuracy."""
    cfg: DigitsTraining = spec.training  # type: ignore[assignment]
    seed = cfg.seed
    data = datasets.load(cfg.source(spec))
    x_train, y_train = data.x_train, data.y_train
    assert x_train is not None and y_train is not None
    if cfg.augment:
        x_train = torch.cat([x_train, _remade_through_image_path(x_train)])
        y_train = torch.cat([y_train, y_train])
    epochs, batch = cfg.epochs, cfg.batch_size
    with _deterministic(seed):
        model = build_module(spec.model_file, spec.model_class, spec.model_kwargs)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        order = torch.Generator().manual_seed(seed)
        for epoch in range(1, epochs + 1):
            model.train()
            for idx in torch.randperm(len(x_train), generator=order).split(batch):
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
                loss.backward()
                optimizer.step()
            _progress(spec.name, epoch, epochs, loss.item())
        model.eval()
        with torch.inference_mode():
            accuracy = (model(data.x_test).argmax(dim=1) == data.y_test).float().mean().item()
    metrics = {"heldout_accuracy": accuracy, "train_rows": len(x_train), "heldout_rows": len(data.x_test)}
    return TrainResult(_save(spec, model, metrics), metrics)


@dataclass(frozen=True)
class Recipe:
    """A training recipe: the options its ``training:`` section takes, and the loop."""

    options: type[TrainingOptions]
    train: Callable[[ModelSpec], TrainResult]


RECIPES: dict[str, Recipe] = {
    "regression": Recipe(RegressionTraining, train_regression),
    "digits": Recipe(DigitsTraining, train_digits),
}


def is_stale(spec: ModelSpec) -> bool:
    """True when there is something to (re)make: weights missing, or older than anything they come from.

    A model without a ``training:`` recipe is never stale: its weights are the user's.
    A missing input counts as newer, so the run that follows names it.
    """
    if spec.base is None and spec.training is None:
        return False
    if not spec.weights.exists():
        return True
    built = spec.weights.stat().st_mtime
    sources = [spec.source, spec.model_file, *made_by(spec)]
    if spec.base is not None:
        sources += [spec.base.weights, spec.base.source]
    return any(not p.exists() or p.stat().st_mtime > built for p in sources) or (spec.base is not None and is_stale(spec.base))


def made_by(spec: ModelSpec) -> list[Path]:
    """The code that writes this spec's weights: retraining follows when it changes."""
    from . import variants

    return [Path(datasets.__file__), Path(__file__ if spec.base is None else variants.__file__)]


def train(spec: ModelSpec) -> TrainResult:
    """Train ``spec`` with its recipe and save ``state_dict`` only; a variant is derived from its base."""
    if spec.base is not None:
        from .variants import derive

        return TrainResult(derive(spec), {})
    if spec.training is None:
        raise ArchiverError(f"{spec.name}: {spec.source.name} has no training: section; its weights ({spec.weights}) come from you")
    return RECIPES[spec.training.recipe].train(spec)


def _save(spec: ModelSpec, model: nn.Module, metrics: dict[str, float]) -> Path:
    spec.weights.parent.mkdir(parents=True, exist_ok=True)
    # Through a buffer: torch.save names the zip's root folder after the file,
    # so the same weights would otherwise differ by file name.
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    spec.weights.write_bytes(buffer.getvalue())
    metrics_path(spec).write_text(json.dumps(metrics, indent=2) + "\n")
    return spec.weights
