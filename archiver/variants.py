"""Cheaper variants of a trained fp32 model, each written as its own weights file.

A variant config names its ``base`` (the fp32 config) and a ``variant.kind``;
``derive(spec)`` makes the variant's file from the base's weights:

    int8_dynamic       torch.ao dynamic quantization of Linear layers; the int8 state_dict is saved
    int8_static        FX graph-mode post-training quantization (x86), calibrated on training inputs
    half               state_dict cast to variant.dtype (float16 for GPU workers, bfloat16 for CPU)
    pruned             L1 unstructured pruning of every Linear/Conv weight at variant.sparsity, optionally
                       fine-tuned under the mask (variant.finetune_epochs), made permanent
    pruned_structured  keeps the model.kwargs[variant.size_kwarg] strongest hidden units between two Linear
                       layers, then optionally fine-tunes them on the fp32 outputs (variant.finetune_epochs)
    distilled          a smaller student (model.kwargs) trained on the teacher's outputs
    onnx               torch.onnx.export with a dynamic batch dimension, checked with onnx.checker
    exported           torch.export program with a dynamic batch dimension (no Python model code needed)
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import prune

from archiver.errors import ArchiverError
from archiver.evaluate import heldout
from archiver.spec import ModelSpec
from handlers.loaders import convert_static_int8, prepare_static_int8, quantize_dynamic_int8, quiet_quantization
from handlers.runtime import build_module, load_eager_model

#: Which handler loader serves each variant kind.
FORMATS: dict[str, str] = {
    "fp32": "eager",
    "int8_dynamic": "int8_dynamic",
    "int8_static": "int8_static",
    "half": "half",
    "pruned": "eager",
    "pruned_structured": "eager",
    "distilled": "eager",
    "onnx": "onnx",
    "exported": "exported",
}


def teacher(spec: ModelSpec) -> nn.Module:
    """The trained fp32 model a variant derives from."""
    base = spec.base
    if base is None or base.kind != "fp32":
        raise ArchiverError(f"{spec.source.name}: a variant's base must be a trained fp32 model config")
    return load_eager_model(base.model_file, base.model_class, base.model_kwargs, base.weights)


def _save_state(model: nn.Module, path: Path) -> None:
    buffer = io.BytesIO()  # not the file directly: torch.save names its zip folder after the file
    with quiet_quantization():
        torch.save(model.state_dict(), buffer)
    path.write_bytes(buffer.getvalue())


def _dynamic_batch_sample(spec: ModelSpec) -> torch.Tensor:
    return torch.zeros(spec.sample_shape)


def derive_int8_dynamic(spec: ModelSpec, fp32: nn.Module) -> None:
    _save_state(quantize_dynamic_int8(fp32), spec.weights)


def derive_int8_static(spec: ModelSpec, fp32: nn.Module) -> None:
    prepared = prepare_static_int8(fp32, spec.sample_shape)
    calibration = heldout(spec).x_train[: int(spec.variant.get("calibration_rows", 512))]
    with torch.inference_mode():
        for chunk in calibration.split(64):
            prepared(chunk)
    _save_state(convert_static_int8(prepared), spec.weights)


def derive_half(spec: ModelSpec, fp32: nn.Module) -> None:
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(str(spec.variant.get("dtype")))
    if dtype is None:
        raise ArchiverError(f"{spec.source.name}: variant.dtype must be float16 or bfloat16")
    _save_state(copy.deepcopy(fp32).to(dtype), spec.weights)


def derive_pruned(spec: ModelSpec, fp32: nn.Module) -> None:
    sparsity = float(spec.variant.get("sparsity", 0.5))
    if not 0.0 < sparsity < 1.0:
        raise ArchiverError(f"{spec.source.name}: variant.sparsity must be between 0 and 1, got {sparsity}")
    model = copy.deepcopy(fp32)
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    for module in layers:
        prune.l1_unstructured(module, name="weight", amount=sparsity)
    epochs = int(spec.variant.get("finetune_epochs", 0))
    if epochs:  # masks stay on while the surviving weights learn to cover for the zeroed ones
        model = fit_to_teacher(spec, model, fp32, epochs)
    for module in layers:
        prune.remove(module, "weight")  # permanent: plain zeros in a plain state_dict
    _save_state(model, spec.weights)


def derive_pruned_structured(spec: ModelSpec, fp32: nn.Module) -> None:
    first_name, second_name = spec.variant.get("layers", ("fc1", "fc2"))
    size_kwarg = str(spec.variant.get("size_kwarg", "hidden"))
    keep = int(spec.model_kwargs[size_kwarg])
    layers = dict(fp32.named_modules())
    first, second = layers.get(first_name), layers.get(second_name)
    if not (isinstance(first, nn.Linear) and isinstance(second, nn.Linear)):
        raise ArchiverError(f"{spec.source.name}: variant.layers must name two Linear layers of {spec.model_class}")
    if keep >= first.out_features:
        raise ArchiverError(f"{spec.source.name}: model.kwargs.{size_kwarg}={keep} removes nothing from {first.out_features} units")
    # A hidden unit's strength: the L1 norm of its incoming weights (rows of the first layer).
    strongest = first.weight.abs().sum(dim=1).topk(keep).indices.sort().values
    small = build_module(spec.model_file, spec.model_class, spec.model_kwargs).eval()
    state = {k: v.clone() for k, v in fp32.state_dict().items()}
    state[f"{first_name}.weight"] = first.weight[strongest].detach().clone()
    state[f"{first_name}.bias"] = first.bias[strongest].detach().clone()
    state[f"{second_name}.weight"] = second.weight[:, strongest].detach().clone()
    small.load_state_dict(state, strict=True)
    epochs = int(spec.variant.get("finetune_epochs", 0))
    if epochs:  # let the kept units take over what the removed ones did
        small = fit_to_teacher(spec, small, fp32, epochs)
    _save_state(small, spec.weights)


def fit_to_teacher(spec: ModelSpec, student: nn.Module, fp32: nn.Module, epochs: int) -> nn.Module:
    """Train ``student`` on the fp32 model's outputs over the training inputs (seeded, one thread).

    Regression students match the teacher's predictions (MSE); classifiers match
    its softened class probabilities (KL divergence at variant.temperature).
    """
    data = heldout(spec)
    cfg = spec.variant
    seed = int(cfg.get("seed", 0))
    temperature = float(cfg.get("temperature", 4.0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one summation order: one seed, one student
    torch.manual_seed(seed)
    try:
        optimizer = torch.optim.Adam(student.parameters(), lr=float(cfg.get("lr", 0.005)))
        with torch.inference_mode():
            targets = fp32(data.x_train)
        order = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            student.train()
            for idx in torch.randperm(len(data.x_train), generator=order).split(int(cfg.get("batch_size", 64))):
                optimizer.zero_grad()
                outputs = student(data.x_train[idx])
                if data.task == "classification":
                    soft = nn.functional.log_softmax(outputs / temperature, dim=1)
                    loss = nn.functional.kl_div(soft, nn.functional.softmax(targets[idx] / temperature, dim=1), reduction="batchmean") * temperature**2
                else:
                    loss = nn.functional.mse_loss(outputs, targets[idx])
                loss.backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return student.eval()


def derive_distilled(spec: ModelSpec, fp32: nn.Module) -> None:
    torch.manual_seed(int(spec.variant.get("seed", 0)))
    student = build_module(spec.model_file, spec.model_class, spec.model_kwargs)
    _save_state(fit_to_teacher(spec, student, fp32, int(spec.variant.get("epochs", 50))), spec.weights)


def derive_onnx(spec: ModelSpec, fp32: nn.Module) -> None:
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError:
        raise ArchiverError(f"{spec.name}: ONNX variants need the onnx extra: pip install -e '.[onnx]'") from None

    sample = _dynamic_batch_sample(spec)
    batch = torch.export.Dim("batch", min=1, max=65536)
    buffer = io.BytesIO()
    with quiet_quantization():
        torch.onnx.export(fp32, (sample,), buffer, input_names=["input"], output_names=["output"], dynamo=True, dynamic_shapes=({0: batch},), verbose=False)
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(proto, full_check=True)
    spec.weights.write_bytes(buffer.getvalue())


def derive_exported(spec: ModelSpec, fp32: nn.Module) -> None:
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.export.export(fp32, (_dynamic_batch_sample(spec),), dynamic_shapes=({0: batch},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    spec.weights.write_bytes(buffer.getvalue())


DERIVE: dict[str, Callable[[ModelSpec, nn.Module], None]] = {
    "int8_dynamic": derive_int8_dynamic,
    "int8_static": derive_int8_static,
    "half": derive_half,
    "pruned": derive_pruned,
    "pruned_structured": derive_pruned_structured,
    "distilled": derive_distilled,
    "onnx": derive_onnx,
    "exported": derive_exported,
}


def derive(spec: ModelSpec) -> Path:
    """Make the variant's weights file from its base's trained weights."""
    if spec.kind not in DERIVE:
        raise ArchiverError(f"{spec.source.name}: variant.kind {spec.kind!r} is not one of {sorted(DERIVE)}")
    spec.weights.parent.mkdir(parents=True, exist_ok=True)
    DERIVE[spec.kind](spec, teacher(spec))
    return spec.weights
