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
