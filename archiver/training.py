"""Training recipes: each turns a spec into a saved state_dict and its held-out score.

A recipe is named by a spec's ``training.recipe``; new data sets add a recipe here.
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from archiver.errors import ArchiverError
from archiver.evaluate import heldout
from archiver.spec import ModelSpec
from handlers.runtime import build_module


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
    cfg = spec.training
    seed = int(cfg.get("seed", 0))
    data = heldout(spec)  # the one place a config becomes data: variants are measured on the same split
    epochs = int(cfg.get("epochs", 300))
    with _deterministic(seed):
        model = build_module(spec.model_file, spec.model_class, spec.model_kwargs)
        criterion = nn.MSELoss()
        optimizer = torch.optim.Adam(model.parameters(), lr=float(cfg.get("lr", 0.05)))
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
    metrics = {"heldout_mse": test_mse, "noise_floor_mse": float(cfg.get("noise", 0.1)) ** 2, "train_rows": len(inputs), "heldout_rows": len(data.x_test)}
    return TrainResult(_save(spec, model, metrics), metrics)


def _remade_through_image_path(images: torch.Tensor) -> torch.Tensor:
    """Each 8x8 digit blown up to a 32x32 picture and converted back as served images are."""
    from PIL import Image

    from handlers.images import to_digit_grid

    def picture(image: torch.Tensor) -> Image.Image:
        pixels = (image[0].repeat_interleave(4, 0).repeat_interleave(4, 1) * 255).round().to(torch.uint8)
        return Image.fromarray(pixels.numpy(), "L")

    return torch.stack([to_digit_grid(picture(image)) for image in images]).unsqueeze(1)


def train_digits(spec: ModelSpec) -> TrainResult:
    """Cross-entropy on scikit-learn's digits, seeded mini-batches, held-out accuracy."""
    cfg = spec.training
    seed = int(cfg.get("seed", 0))
    data = heldout(spec)
    x_train, y_train = data.x_train, data.y_train
    if cfg.get("augment", False):
        x_train = torch.cat([x_train, _remade_through_image_path(x_train)])
        y_train = torch.cat([y_train, y_train])
    epochs, batch = int(cfg.get("epochs", 25)), int(cfg.get("batch_size", 64))
    with _deterministic(seed):
        model = build_module(spec.model_file, spec.model_class, spec.model_kwargs)
        optimizer = torch.optim.Adam(model.parameters(), lr=float(cfg.get("lr", 0.002)))
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


RECIPES: dict[str, Callable[[ModelSpec], TrainResult]] = {
    "regression": train_regression,
    "digits": train_digits,
}


def is_stale(spec: ModelSpec) -> bool:
    """True when the weights are missing or older than the config, model file or base weights they came from."""
    if not spec.weights.exists():
        return True
    built = spec.weights.stat().st_mtime
    sources = [spec.source, spec.model_file] + ([spec.base.weights, spec.base.source] if spec.base else [])
    return any(p.stat().st_mtime > built for p in sources if p.exists()) or (spec.base is not None and is_stale(spec.base))


def train(spec: ModelSpec) -> TrainResult:
    """Train ``spec`` with its recipe and save ``state_dict`` only; a variant is derived from its base."""
    if spec.base is not None:
        from archiver.variants import derive

        return TrainResult(derive(spec), {})
    recipe = spec.training.get("recipe")
    if recipe not in RECIPES:
        raise ArchiverError(f"{spec.source.name}: training.recipe {recipe!r} is not one of {sorted(RECIPES)}")
    return RECIPES[recipe](spec)


def _save(spec: ModelSpec, model: nn.Module, metrics: dict[str, float]) -> Path:
    spec.weights.parent.mkdir(parents=True, exist_ok=True)
    # Through a buffer: torch.save names the zip's root folder after the file,
    # so the same weights would otherwise differ by file name.
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    spec.weights.write_bytes(buffer.getvalue())
    metrics_path(spec).write_text(json.dumps(metrics, indent=2) + "\n")
    return spec.weights
