"""Held-out quality, fidelity to fp32, size and latency of a built model.

Every archive gets the same measurements, so variants compare on one table.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from archiver.datasets import load_digits_split, make_regression
from archiver.errors import ArchiverError
from archiver.spec import ModelSpec

Model = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Heldout:
    """Held-out inputs and truth for a model's task, and the training inputs (for calibration and distillation)."""

    task: str  # "regression" or "classification"
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def heldout(spec: ModelSpec) -> Heldout:
    """The data the spec's fp32 origin was trained and evaluated on, regenerated from its seed."""
    origin = spec.origin
    cfg = origin.training
    recipe = cfg.get("recipe")
    if recipe == "regression":
        data = make_regression(int(cfg.get("seed", 0)), int(cfg.get("samples", 2000)), int(origin.sample_shape[-1]), float(cfg.get("holdout", 0.2)), float(cfg.get("noise", 0.1)))
        return Heldout("regression", data.x_train, data.y_train, data.x_test, data.y_test)
    if recipe == "digits":
        digits = load_digits_split(int(cfg.get("seed", 0)), float(cfg.get("holdout", 0.2)))
        return Heldout("classification", digits.x_train, digits.y_train, digits.x_test, digits.y_test)
    raise ArchiverError(f"{origin.source.name}: no held-out data for training.recipe {recipe!r}")


def served_numbers(outputs: torch.Tensor, task: str) -> torch.Tensor:
    """What a client receives: predictions for regression, probabilities for classification."""
    return torch.softmax(outputs.float(), dim=1) if task == "classification" else outputs.float()


def quality(outputs: torch.Tensor, data: Heldout) -> dict[str, float]:
    if data.task == "classification":
        return {"accuracy": (outputs.argmax(dim=1) == data.y_test).float().mean().item()}
    return {"mse": torch.mean((outputs.float() - data.y_test) ** 2).item()}


def run(model: Model, inputs: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(inputs).float()


def latency_ms(model: Model, row: torch.Tensor, batch: int, repeats: int = 30) -> float:
    """Median in-process milliseconds for one forward of ``batch`` copies of ``row``, after warm-up."""
    inputs = row.expand(batch, *row.shape[1:]).contiguous()
    times = []
    with torch.inference_mode():
        for i in range(repeats + 5):
            start = time.perf_counter()
            model(inputs)
            if i >= 5:
                times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def count_parameters(weights: Path) -> tuple[int, int]:
    """(parameters, non-zero parameters) stored in a weights file of any format."""
    tensors: list[torch.Tensor] = []
    if weights.suffix == ".onnx":
        import onnx
        from onnx import numpy_helper

        tensors = [torch.from_numpy(numpy_helper.to_array(t).copy()) for t in onnx.load(str(weights)).graph.initializer]
    elif weights.suffix == ".pt2":
        tensors = list(torch.export.load(str(weights)).state_dict.values())
    else:
        from handlers.loaders import quiet_quantization

        with quiet_quantization():
            state = torch.load(weights, map_location="cpu", weights_only=True)
        for key, value in state.items():
            if not key.endswith(("scale", "zero_point")):
                tensors.extend(_tensors(value))
    total = sum(t.numel() for t in tensors)
    nonzero = sum(int(torch.count_nonzero(t.int_repr() if t.is_quantized else t)) for t in tensors)
    return total, nonzero


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def check_fidelity(spec: ModelSpec, metrics: Mapping[str, float], reference: Mapping[str, float]) -> None:
    """Refuse a variant that misses a bound of its config's ``fidelity:`` section, saying by how much.

    Bounds: ``max_abs_diff`` and ``mean_abs_diff`` (served numbers against fp32),
    ``min_accuracy``, ``max_accuracy_drop`` (points against fp32), ``max_mse_ratio``
    (MSE no worse than this multiple of fp32's).
    """
    bounds = spec.fidelity
    misses = []
    for key, metric in (("max_abs_diff", "max_abs_diff"), ("mean_abs_diff", "mean_abs_diff")):
        if key in bounds and metrics[metric] > bounds[key]:
            misses.append(f"{metric} {metrics[metric]:.4g} exceeds {bounds[key]} by {metrics[metric] - bounds[key]:.4g}")
    if "min_accuracy" in bounds and metrics["accuracy"] < bounds["min_accuracy"]:
        misses.append(f"accuracy {metrics['accuracy']:.4f} is below {bounds['min_accuracy']} by {bounds['min_accuracy'] - metrics['accuracy']:.4f}")
    if "max_accuracy_drop" in bounds:
        drop = reference["accuracy"] - metrics["accuracy"]
        if drop > bounds["max_accuracy_drop"]:
            misses.append(f"accuracy drops {drop:.4f} from fp32, more than {bounds['max_accuracy_drop']} by {drop - bounds['max_accuracy_drop']:.4f}")
    if "max_mse_ratio" in bounds:
        ratio = metrics["mse"] / reference["mse"]
        if ratio > bounds["max_mse_ratio"]:
            misses.append(f"MSE is {ratio:.3f}x fp32's, more than {bounds['max_mse_ratio']}x by {ratio - bounds['max_mse_ratio']:.3f}")
    if misses:
        raise ArchiverError(f"{spec.name}: misses its fidelity bound ({spec.source.name}): " + "; ".join(misses))
