"""Seeded, generated data with a known ground truth (nothing is downloaded)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.images, digits.target, test_size=holdout, random_state=seed, stratify=digits.target
    )

    def images(a: object) -> torch.Tensor:
        return torch.tensor(a, dtype=torch.float32).unsqueeze(1) / DIGITS_MAX

    return DigitsSplit(images(x_train), torch.tensor(y_train), images(x_test), torch.tensor(y_test))
