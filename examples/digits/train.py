"""Train DigitsCNN on scikit-learn's 8x8 handwritten digits (they ship with scikit-learn: nothing is downloaded).

``ts-archive train digits`` (``make train`` in the repository) calls :func:`fit`, because
``model_configs/digits.yaml`` says ``training: {recipe: train.py:fit, ...}``; the rest of that
section is :class:`Options`. It writes ``artifacts/digits.pt`` (the state_dict),
``artifacts/digits.metrics.json`` and ``data/digits.pt`` (the split, as model inputs: ink / 16,
shape (n, 1, 8, 8)). The same seed gives the same weights file, byte for byte.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from digits_handler import to_digit_grid  # beside this file: the conversion served images go through
from torch import nn

from serveready.archiver import TrainingJob
from serveready.handlers import option

#: The digits data set counts ink pixels per 4x4 block of a 32x32 bitmap: 0..16.
DIGITS_MAX = 16.0


@dataclass(frozen=True, kw_only=True)
class Options:
    """``training:`` of digits.yaml."""

    seed: int = option(0, minimum=0, doc="seeds the split, the mini-batches and the weights")
    holdout: float = option(0.2, minimum=0.01, maximum=0.99, doc="fraction of the 1797 digits held out (stratified)")
    epochs: int = option(25, minimum=1)
    batch_size: int = option(64, minimum=1)
    lr: float = option(0.002, minimum=0)
    augment: bool = option(False, doc="also train on each digit re-made through the image path")


def load_split(seed: int, holdout: float) -> dict[str, torch.Tensor]:
    """The 1797 images as (n, 1, 8, 8) floats in [0, 1], split stratified by class with ``seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(digits.images, digits.target, test_size=holdout, random_state=seed, stratify=digits.target)

    def images(a: object) -> torch.Tensor:
        return torch.tensor(a, dtype=torch.float32).unsqueeze(1) / DIGITS_MAX

    return {"x_train": images(x_train), "y_train": torch.tensor(y_train), "x_test": images(x_test), "y_test": torch.tensor(y_test)}


def remade_through_image_path(images: torch.Tensor) -> torch.Tensor:
    """Each 8x8 digit blown up to a 32x32 picture and converted back as served images are."""
    from PIL import Image

    def picture(image: torch.Tensor) -> Image.Image:
        pixels = (image[0].repeat_interleave(4, 0).repeat_interleave(4, 1) * 255).round().to(torch.uint8)
        return Image.fromarray(pixels.numpy(), "L")

    return torch.stack([to_digit_grid(picture(image)) for image in images]).unsqueeze(1)


def fit(job: TrainingJob, options: Options) -> dict[str, float]:
    """Cross-entropy, Adam, seeded mini-batches, one thread; held-out accuracy."""
    data = load_split(options.seed, options.holdout)
    x_train, y_train = data["x_train"], data["y_train"]
    if options.augment:
        x_train = torch.cat([x_train, remade_through_image_path(x_train)])
        y_train = torch.cat([y_train, y_train])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one summation order: one seed, one weights file
    torch.manual_seed(options.seed)
    try:
        model = job.build_model()
        optimizer = torch.optim.Adam(model.parameters(), lr=options.lr)
        order = torch.Generator().manual_seed(options.seed)
        for epoch in range(1, options.epochs + 1):
            model.train()
            for idx in torch.randperm(len(x_train), generator=order).split(options.batch_size):
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
                loss.backward()
                optimizer.step()
            if epoch % max(options.epochs // 10, 1) == 0 or epoch == options.epochs:
                sys.stderr.write(f"\r  {job.name}: epoch {epoch}/{options.epochs} train loss {loss.item():.5f}" + ("\n" if epoch == options.epochs else ""))
        model.eval()
        with torch.inference_mode():
            accuracy = (model(data["x_test"]).argmax(dim=1) == data["y_test"]).float().mean().item()
    finally:
        torch.set_num_threads(threads)
    metrics = {"heldout_accuracy": accuracy, "train_rows": len(x_train), "heldout_rows": len(data["x_test"])}
    job.save(model, metrics)
    job.save_data(data["x_test"], data["y_test"], data["x_train"], data["y_train"])
    return metrics
