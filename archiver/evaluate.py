"""Measurements of a built archive: size, parameters, held-out quality, fidelity to fp32, latency.

Every archive gets the same measurements, so variants compare on one table. Quality
and fidelity need held-out data (the config's ``data:`` file); without data they are left
out of the report, and a ``fidelity:`` bound cannot be checked, so it is refused.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from serveready.handlers.inputs import Inputs, chunks, logits, repeat_row, select

from . import datasets, weights
from .errors import ArchiverError

if TYPE_CHECKING:
    from .spec import ModelSpec

Model = Callable[..., torch.Tensor]


def run(model: Model, inputs: Inputs) -> torch.Tensor:
    """Outputs for ``inputs`` in chunks, as float32."""
    with torch.inference_mode():
        return torch.cat([logits(model(*chunk)).float() for chunk in chunks(inputs, 1024)])


def served_numbers(outputs: torch.Tensor, task: str) -> torch.Tensor:
    """What a client receives: predictions for regression, probabilities for classification."""
    return torch.softmax(outputs.float(), dim=1) if task == "classification" else outputs.float()


def quality(outputs: torch.Tensor, data: datasets.Split) -> dict[str, float]:
    """Top-1 accuracy (classification) or MSE (regression) on the held-out rows."""
    if data.task == "classification":
        return {"accuracy": (outputs.argmax(dim=1) == data.y_test).float().mean().item()}
    return {"mse": torch.mean((outputs.float() - data.y_test.reshape(outputs.shape)) ** 2).item()}


def latency_ms(model: Model, row: Inputs, batch: int, repeats: int = 30) -> float:
    """Median in-process milliseconds for one forward of ``batch`` copies of ``row``, after warm-up."""
    inputs = repeat_row(row, batch)
    times = []
    with torch.inference_mode():
        for i in range(repeats + 5):
            start = time.perf_counter()
            model(*inputs)
            if i >= 5:
                times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def measure(spec: ModelSpec, model: Model, archive: Path, weights_file: Path, reference: Model | None) -> tuple[dict[str, Any], dict[str, float]]:
    """The report's row for one archive, and its fp32 reference's quality (empty without data).

    Args:
        spec: what was built.
        model: the archive's model, loaded by the worker's own loader.
        archive: the built ``.mar``.
        weights_file: the weights packed into it.
        reference: the fp32 model a variant is compared with; None for the fp32 model itself.
    """
    params, nonzero = weights.count(spec.kind_info.tensors(weights_file))
    row: dict[str, Any] = {
        "name": spec.name,
        "base": spec.origin.name,
        "variant": spec.kind,
        "kind": spec.variant.label(),
        "format": spec.kind_info.format,
        "archive_bytes": archive.stat().st_size,
        "weights_bytes": weights_file.stat().st_size,
        "parameters": params,
        "nonzero_parameters": nonzero,
    }
    source = spec.data
    data = datasets.load(source) if source is not None else None
    reference_quality: dict[str, float] = {}
    if data is not None:
        outputs = run(model, data.x_test)
        expected = run(reference, data.x_test) if reference is not None else outputs
        diff = (served_numbers(outputs, data.task) - served_numbers(expected, data.task)).abs()
        reference_quality = quality(expected, data)
        row.update(quality(outputs, data), heldout_rows=len(data.y_test), max_abs_diff=diff.max().item(), mean_abs_diff=diff.mean().item())
    sample = select(data.x_test, slice(0, 1)) if data is not None else tuple(spec.sample_inputs.values())
    threads = torch.get_num_threads()
    torch.set_num_threads(spec.handler_options.torch_threads or 1)  # as a worker runs it
    try:
        row["latency_ms_1_row"], row["latency_ms_64_rows"] = (latency_ms(model, sample, n) for n in (1, 64))
    finally:
        torch.set_num_threads(threads)
    return row, reference_quality


def check_fidelity(spec: ModelSpec, metrics: Mapping[str, float], reference: Mapping[str, float]) -> None:
    """Refuse a variant that misses a bound of its config's ``fidelity:`` section, saying by how much.

    Bounds: ``max_abs_diff`` and ``mean_abs_diff`` (served numbers against fp32),
    ``min_accuracy``, ``max_accuracy_drop`` (points against fp32), ``max_mse_ratio``
    (MSE no worse than this multiple of fp32's).
    """
    bounds = spec.fidelity.bounds
    if not bounds:
        return
    if "max_abs_diff" not in metrics:
        raise ArchiverError(f"{spec.name}: fidelity bounds ({', '.join(bounds)}) need held-out data: give {spec.origin.source.name} a data: file")
    task_metric = {"min_accuracy": "accuracy", "max_accuracy_drop": "accuracy", "max_mse_ratio": "mse"}
    for key, metric in task_metric.items():
        if key in bounds and metric not in metrics:
            raise ArchiverError(f"{spec.name}: fidelity.{key} does not apply to a {'regression' if metric == 'accuracy' else 'classification'} model")
    misses = []
    for key in ("max_abs_diff", "mean_abs_diff"):
        if key in bounds and metrics[key] > bounds[key]:
            misses.append(f"{key} {metrics[key]:.4g} exceeds {bounds[key]} by {metrics[key] - bounds[key]:.4g}")
    if "min_accuracy" in bounds and metrics["accuracy"] < bounds["min_accuracy"]:
        misses.append(f"accuracy {metrics['accuracy']:.4f} is below {bounds['min_accuracy']} by {bounds['min_accuracy'] - metrics['accuracy']:.4f}")
    if "max_accuracy_drop" in bounds:
        drop = reference["accuracy"] - metrics["accuracy"]
        if drop > bounds["max_accuracy_drop"]:
            misses.append(f"accuracy drops {drop:.4f} from fp32, more than {bounds['max_accuracy_drop']} by {drop - bounds['max_accuracy_drop']:.4f}")
    if "max_mse_ratio" in bounds:
        ratio = metrics["mse"] / reference["mse"] if reference["mse"] > 0 else (1.0 if metrics["mse"] == 0 else float("inf"))
        if ratio > bounds["max_mse_ratio"]:
            misses.append(f"MSE is {ratio:.3f}x fp32's, more than {bounds['max_mse_ratio']}x by {ratio - bounds['max_mse_ratio']:.3f}")
    if misses:
        raise ArchiverError(f"{spec.name}: misses its fidelity bound ({spec.source.name}): " + "; ".join(misses))
