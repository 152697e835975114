"""Train the article's Net on a seeded, generated linear-regression task (nothing is downloaded).

``ts-archive train net`` (``make train`` in the repository) calls :func:`fit`, because
``model_configs/net.yaml`` says ``training: {recipe: train.py:fit, ...}``; the rest of that
section is :class:`Options`, validated before anything runs. It writes ``artifacts/net.pt``
(the state_dict), ``artifacts/net.metrics.json`` and ``data/net.pt`` (the split, which the
build report and the variants read). The same seed gives the same weights file, byte for byte.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

from serveready.archiver import TrainingJob
from serveready.handlers import option


@dataclass(frozen=True, kw_only=True)
class Options:
    """``training:`` of net.yaml: the task and the loop."""

    seed: int = option(0, minimum=0, doc="seeds the data and the weights: the same seed gives the same file")
    samples: int = option(2000, minimum=2, doc="rows generated in all")
    holdout: float = option(0.2, minimum=0.01, maximum=0.99, doc="fraction of rows held out")
    noise: float = option(0.1, minimum=0, doc="standard deviation of the target's noise")
    epochs: int = option(300, minimum=1)
    lr: float = option(0.05, minimum=0)


def make_regression(seed: int, samples: int, width: int, holdout: float, noise: float) -> dict[str, torch.Tensor]:
    """``y = x @ w + b + noise`` from ``seed`` alone (a private generator: the global RNG is left alone)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(width, 1, generator=gen)
    bias = float(torch.randn(1, generator=gen))
    x = torch.randn(samples, width, generator=gen)
    y = x @ weight + bias + noise * torch.randn(samples, 1, generator=gen)
    n_test = max(int(samples * holdout), 1)
    return {"x_train": x[n_test:], "y_train": y[n_test:], "x_test": x[:n_test], "y_test": y[:n_test]}


def fit(job: TrainingJob, options: Options) -> dict[str, float]:
    """The article's training loop (MSE, Adam, full batch), with the targets it forgot to define."""
    data = make_regression(options.seed, options.samples, job.sample_shape[-1], options.holdout, options.noise)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one summation order: one seed, one weights file
    torch.manual_seed(options.seed)
    try:
        model = job.build_model()
        criterion = nn.MSELoss()
        optimizer = torch.optim.Adam(model.parameters(), lr=options.lr)
        model.train()
        for epoch in range(1, options.epochs + 1):
            optimizer.zero_grad()
            loss = criterion(model(data["x_train"]), data["y_train"])
            loss.backward()
            optimizer.step()
            if epoch % max(options.epochs // 10, 1) == 0 or epoch == options.epochs:
                sys.stderr.write(f"\r  {job.name}: epoch {epoch}/{options.epochs} train loss {loss.item():.5f}" + ("\n" if epoch == options.epochs else ""))
        model.eval()
        with torch.inference_mode():
            test_mse = criterion(model(data["x_test"]), data["y_test"]).item()
    finally:
        torch.set_num_threads(threads)
    metrics = {"heldout_mse": test_mse, "noise_floor_mse": options.noise**2, "train_rows": len(data["x_train"]), "heldout_rows": len(data["x_test"])}
    job.save(model, metrics)
    job.save_data(data["x_test"], data["y_test"], data["x_train"], data["y_train"])
    return metrics
