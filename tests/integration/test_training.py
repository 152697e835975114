"""Training: seeded, reproducible, and as good as the noise allows."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from serveready.archiver import ModelSpec, train
from serveready.archiver.training import is_stale, metrics_path
from tests.conftest import net_split, reference_net


def test_same_seed_gives_the_same_weights_file(net_spec: ModelSpec, tmp_path: Path) -> None:
    again = dataclasses.replace(net_spec, weights=tmp_path / "again.pt", data_file=dataclasses.replace(net_spec.data_file, path=tmp_path / "again_data.pt"))
    train(again)
    assert again.weights.read_bytes() == net_spec.weights.read_bytes()


def test_other_seed_gives_other_weights(net_spec: ModelSpec, tmp_path: Path) -> None:
    hook = net_spec.training
    other = dataclasses.replace(net_spec, weights=tmp_path / "other.pt", data_file=dataclasses.replace(net_spec.data_file, path=tmp_path / "other_data.pt"),
                                training=dataclasses.replace(hook, options=dataclasses.replace(hook.options, seed=1)))
    train(other)
    assert other.weights.read_bytes() != net_spec.weights.read_bytes()


def test_heldout_mse_is_recorded_and_near_the_noise_floor(net_spec: ModelSpec) -> None:
    recorded = json.loads(metrics_path(net_spec.weights).read_text())
    cfg = net_spec.training.options
    data = net_split()
    predicted = reference_net(net_spec.weights, data["x_test"].numpy())
    mse = float(np.mean((predicted - data["y_test"].double().numpy()) ** 2))
    assert abs(mse - recorded["heldout_mse"]) < 1e-6
    # Net is linear overall, so it can reach the noise variance (0.01) but not beat it by much.
    assert 0.008 < mse < 1.2 * cfg.noise**2


def test_is_stale_follows_file_times(net_spec: ModelSpec, tmp_path: Path) -> None:
    assert not is_stale(net_spec)
    assert is_stale(dataclasses.replace(net_spec, weights=tmp_path / "missing.pt"))
    assert is_stale(dataclasses.replace(net_spec, data_file=dataclasses.replace(net_spec.data_file, path=tmp_path / "missing_data.pt")))


def test_the_hook_writes_the_split_the_archiver_reads(net_spec: ModelSpec) -> None:
    """examples/net/train.py saves the held-out and training rows into net.yaml's data: file."""
    import torch

    saved = torch.load(net_spec.data_file.path, weights_only=True)
    expected = net_split()
    assert set(saved) == {"x_test", "y_test", "x_train", "y_train"}
    assert all(torch.equal(saved[k], expected[k]) for k in saved)
