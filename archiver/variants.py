"""Cheaper variants of a trained fp32 model, and the one registry of variant kinds.

A variant config names its ``base`` (an fp32 config) and a ``variant: {kind: ...}``;
:data:`KINDS` says, for each kind, everything the archiver needs: the options its
``variant:`` section takes, how its weights file is derived from the fp32 weights,
which handler loader serves it, whether the archive ships the Python model file, what
its weights file holds (for the report's parameter counts) and its label in the report.
A new kind is one entry here plus one loader in ``serveready.handlers.loaders``.

    fp32               the trained model itself
    int8_dynamic       torch.ao dynamic quantization of Linear layers; the int8 state_dict is saved
    int8_static        FX graph-mode post-training quantization (x86), calibrated on training inputs
    half               state_dict cast to variant.dtype (float16 for GPU workers, bfloat16 for CPU)
    pruned             L1 unstructured pruning of every Linear/Conv weight at variant.sparsity, optionally
                       fine-tuned under the mask (variant.finetune_epochs), made permanent
    pruned_structured  keeps the model.kwargs[variant.size_kwarg] strongest hidden units between two Linear
                       layers, then optionally fine-tunes them on the fp32 outputs (variant.finetune_epochs)
    distilled          a smaller student (model.kwargs) trained on the teacher's outputs
    onnx               torch.onnx.export with a dynamic batch dimension (and the handler's other varying
                       dimensions: a text model's sequence), checked with onnx.checker
    exported           torch.export program with the same dynamic dimensions (no Python model code needed)
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn
from torch.nn.utils import prune

from serveready.handlers.config import option
from serveready.handlers.errors import ConfigError
from serveready.handlers.inputs import Inputs, chunks, logits, rows, select
from serveready.handlers.loaders import convert_static_int8, prepare_static_int8, quantize_dynamic_int8, quiet_quantization
from serveready.handlers.runtime import build_module, load_eager_model

from . import datasets
from .errors import ArchiverError
from .weights import onnx_tensors, program_tensors, state_dict_tensors

if TYPE_CHECKING:
    from .spec import ModelSpec


# -- each kind's variant: options ---------------------------------------------


@dataclass(frozen=True, kw_only=True)
class VariantOptions:
    """``variant:`` of a config; every kind's own class adds its options."""

    kind: str = "fp32"

    def label(self) -> str:
        """The kind as the report shows it."""
        return self.kind


@dataclass(frozen=True, kw_only=True)
class FinetuneOptions(VariantOptions):
    """How a student or a pruned model learns from the fp32 model's outputs (seeded, one thread)."""

    seed: int = option(0, minimum=0)
    lr: float = option(0.005, minimum=0, doc="Adam learning rate")
    batch_size: int = option(64, minimum=1)
    temperature: float = option(4.0, minimum=0.01, doc="softening of class probabilities (classifiers)")


@dataclass(frozen=True, kw_only=True)
class Int8StaticOptions(VariantOptions):
    calibration_rows: int = option(512, minimum=1, doc="training inputs the observers see")


@dataclass(frozen=True, kw_only=True)
class HalfOptions(VariantOptions):
    dtype: Literal["float16", "bfloat16"] = option(doc="float16 for GPU workers, bfloat16 for CPU")

    def label(self) -> str:
        return self.dtype


@dataclass(frozen=True, kw_only=True)
class PrunedOptions(FinetuneOptions):
    sparsity: float = option(0.5, minimum=0.01, maximum=0.99, doc="fraction of each layer's weights set to zero")
    finetune_epochs: int = option(0, minimum=0)


@dataclass(frozen=True, kw_only=True)
class StructuredOptions(FinetuneOptions):
    layers: tuple[str, ...] = option(("fc1", "fc2"), doc="the two Linear layers around the hidden units")
    size_kwarg: str = option("hidden", doc="the model kwarg that sets the number of hidden units")
    finetune_epochs: int = option(0, minimum=0)

    def __post_init__(self) -> None:
        if len(self.layers) != 2:
            raise ConfigError(f"layers must name two Linear layers, got {list(self.layers)}")


@dataclass(frozen=True, kw_only=True)
class DistilledOptions(FinetuneOptions):
    epochs: int = option(50, minimum=1)


# -- how each kind is derived ---------------------------------------------------


def teacher(spec: ModelSpec) -> nn.Module:
    """The trained fp32 model a variant derives from."""
    base = spec.base
    if base is None or base.kind != "fp32":
        raise ArchiverError(f"{spec.source.name}: a variant's base must be a trained fp32 model config")
    if not base.weights.is_file():
        raise ArchiverError(f"{spec.name}: the weights of its base {base.name} ({base.weights}) do not exist yet")
    return load_eager_model(base.model_file, base.model_class, base.model_kwargs, base.weights)


def _save_state(model: nn.Module, path: Path) -> None:
    buffer = io.BytesIO()  # not the file directly: torch.save names its zip folder after the file
    with quiet_quantization():
        torch.save(model.state_dict(), buffer)
    path.write_bytes(buffer.getvalue())


def _split(spec: ModelSpec, purpose: str) -> datasets.Split:
    source = spec.data
    if source is None:
        raise ArchiverError(f"{spec.name}: {purpose} needs data: give {spec.origin.source.name} a data: file")
    return datasets.load(source)


def _training_inputs(spec: ModelSpec, purpose: str) -> Inputs:
    try:
        return _split(spec, purpose).training_inputs(purpose)
    except ArchiverError as err:
        raise ArchiverError(f"{spec.name}: {err.message}") from None


def derive_int8_dynamic(spec: ModelSpec, fp32: nn.Module) -> None:
    _save_state(quantize_dynamic_int8(fp32), spec.weights)


def derive_int8_static(spec: ModelSpec, fp32: nn.Module) -> None:
    prepared = prepare_static_int8(fp32, spec.sample_shape)
    calibration = select(_training_inputs(spec, "int8 static calibration"), slice(0, spec.variant.calibration_rows))
    with torch.inference_mode():
        for chunk in chunks(calibration, 64):
            prepared(*chunk)
    _save_state(convert_static_int8(prepared), spec.weights)


def derive_half(spec: ModelSpec, fp32: nn.Module) -> None:
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[spec.variant.dtype]
    _save_state(copy.deepcopy(fp32).to(dtype), spec.weights)


def derive_pruned(spec: ModelSpec, fp32: nn.Module) -> None:
    options: PrunedOptions = spec.variant
    model = copy.deepcopy(fp32)
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    for module in layers:
        prune.l1_unstructured(module, name="weight", amount=options.sparsity)
    if options.finetune_epochs:  # masks stay on while the surviving weights learn to cover for the zeroed ones
        model = fit_to_teacher(spec, model, fp32, options.finetune_epochs)
    for module in layers:
        prune.remove(module, "weight")  # permanent: plain zeros in a plain state_dict
    _save_state(model, spec.weights)


def derive_pruned_structured(spec: ModelSpec, fp32: nn.Module) -> None:
    options: StructuredOptions = spec.variant
    first_name, second_name = options.layers
    if options.size_kwarg not in spec.model_kwargs:
        raise ArchiverError(f"{spec.source.name}: model.kwargs has no {options.size_kwarg!r} (variant.size_kwarg) to say how many units to keep")
    keep = int(spec.model_kwargs[options.size_kwarg])
    layers = dict(fp32.named_modules())
    first, second = layers.get(first_name), layers.get(second_name)
    if not (isinstance(first, nn.Linear) and isinstance(second, nn.Linear)):
        raise ArchiverError(f"{spec.source.name}: variant.layers must name two Linear layers of {spec.model_class}")
    if keep >= first.out_features:
        raise ArchiverError(f"{spec.source.name}: model.kwargs.{options.size_kwarg}={keep} removes nothing from {first.out_features} units")
    # A hidden unit's strength: the L1 norm of its incoming weights (rows of the first layer).
    strongest = first.weight.abs().sum(dim=1).topk(keep).indices.sort().values
    small = build_module(spec.model_file, spec.model_class, spec.model_kwargs).eval()
    state = {k: v.clone() for k, v in fp32.state_dict().items()}
    state[f"{first_name}.weight"] = first.weight[strongest].detach().clone()
    state[f"{first_name}.bias"] = first.bias[strongest].detach().clone()
    state[f"{second_name}.weight"] = second.weight[:, strongest].detach().clone()
    small.load_state_dict(state, strict=True)
    if options.finetune_epochs:  # let the kept units take over what the removed ones did
        small = fit_to_teacher(spec, small, fp32, options.finetune_epochs)
    _save_state(small, spec.weights)


def fit_to_teacher(spec: ModelSpec, student: nn.Module, fp32: nn.Module, epochs: int) -> nn.Module:
    """Train ``student`` on the fp32 model's outputs over the training inputs (seeded, one thread).

    Regression students match the teacher's predictions (MSE); classifiers match
    its softened class probabilities (KL divergence at variant.temperature).
    """
    options: FinetuneOptions = spec.variant
    inputs = _training_inputs(spec, f"variant kind {spec.kind}")
    classification = _split(spec, "fine-tuning").task == "classification"
    temperature = options.temperature
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one summation order: one seed, one student
    torch.manual_seed(options.seed)
    try:
        optimizer = torch.optim.Adam(student.parameters(), lr=options.lr)
        with torch.inference_mode():
            targets = torch.cat([logits(fp32(*chunk)) for chunk in chunks(inputs, 1024)])
        order = torch.Generator().manual_seed(options.seed)
        for _ in range(epochs):
            student.train()
            for idx in torch.randperm(rows(inputs), generator=order).split(options.batch_size):
                optimizer.zero_grad()
                outputs = logits(student(*select(inputs, idx)))
                if classification:
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
    torch.manual_seed(spec.variant.seed)
    student = build_module(spec.model_file, spec.model_class, spec.model_kwargs)
    _save_state(fit_to_teacher(spec, student, fp32, spec.variant.epochs), spec.weights)


def _dynamic_shapes(inputs: dict[str, torch.Tensor], dims: dict[int, tuple[str, int]]) -> tuple[dict[int, Any], ...]:
    """torch.export's dynamic_shapes for ``inputs``: the batch, and the handler's varying dimensions, of each."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    varying = {dim: torch.export.Dim(name, min=1, max=largest) for dim, (name, largest) in dims.items()}
    return tuple({0: batch, **{d: v for d, v in varying.items() if d < t.ndim}} for t in inputs.values())


def onnx_bytes(name: str, model: nn.Module, inputs: dict[str, torch.Tensor], dims: dict[int, tuple[str, int]] | None = None) -> bytes:
    """``model`` as a checked ONNX file: inputs named as the handler names them ("input" for one), output
    "output", a dynamic batch dimension and the handler's varying ones (``dims``)."""
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError:
        raise ArchiverError(f"{name}: ONNX export needs the onnx extra: pip install 'serveready[onnx]'") from None
    buffer = io.BytesIO()
    with quiet_quantization():
        torch.onnx.export(model, tuple(inputs.values()), buffer, input_names=list(inputs), output_names=["output"],
                          dynamo=True, dynamic_shapes=_dynamic_shapes(inputs, dims or {}), verbose=False)
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(proto, full_check=True)
    return buffer.getvalue()


def derive_onnx(spec: ModelSpec, fp32: nn.Module) -> None:
    spec.weights.write_bytes(onnx_bytes(spec.name, fp32, spec.sample_inputs, spec.dynamic_dims))


def derive_exported(spec: ModelSpec, fp32: nn.Module) -> None:
    inputs = spec.sample_inputs
    program = torch.export.export(fp32, tuple(inputs.values()), dynamic_shapes=_dynamic_shapes(inputs, spec.dynamic_dims))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    spec.weights.write_bytes(buffer.getvalue())


# -- the registry -----------------------------------------------------------------


@dataclass(frozen=True)
class VariantKind:
    """Everything the archiver knows about one kind of archive."""

    name: str
    #: the handler loader that serves it (``model.format`` in the archive)
    format: str
    #: the ``variant:`` section's options
    options: type[VariantOptions]
    #: writes ``spec.weights`` from the fp32 model; None for the trained model itself
    derive: Callable[[ModelSpec, nn.Module], None] | None
    #: what the weights file holds, as tensors (parameter counts in the report)
    tensors: Callable[[Path], list[torch.Tensor]]
    #: the archive carries the Python model file (formats that rebuild the class)
    ships_model_file: bool = True
    #: the derived weights file's suffix
    suffix: str = ".pt"


KINDS: dict[str, VariantKind] = {
    kind.name: kind
    for kind in (
        VariantKind("fp32", "eager", VariantOptions, None, state_dict_tensors),
        VariantKind("int8_dynamic", "int8_dynamic", VariantOptions, derive_int8_dynamic, state_dict_tensors),
        VariantKind("int8_static", "int8_static", Int8StaticOptions, derive_int8_static, state_dict_tensors),
        VariantKind("half", "half", HalfOptions, derive_half, state_dict_tensors),
        VariantKind("pruned", "eager", PrunedOptions, derive_pruned, state_dict_tensors),
        VariantKind("pruned_structured", "eager", StructuredOptions, derive_pruned_structured, state_dict_tensors),
        VariantKind("distilled", "eager", DistilledOptions, derive_distilled, state_dict_tensors),
        VariantKind("onnx", "onnx", VariantOptions, derive_onnx, onnx_tensors, ships_model_file=False, suffix=".onnx"),
        VariantKind("exported", "exported", VariantOptions, derive_exported, program_tensors, ships_model_file=False, suffix=".pt2"),
    )
}


def derive(spec: ModelSpec) -> Path:
    """Make the variant's weights file (``spec.weights``) from its base's trained weights."""
    kind = KINDS[spec.kind]
    if kind.derive is None:
        raise ArchiverError(f"{spec.name} is a trained model, not a variant: it has nothing to derive from")
    spec.weights.parent.mkdir(parents=True, exist_ok=True)
    kind.derive(spec, teacher(spec))
    return spec.weights
