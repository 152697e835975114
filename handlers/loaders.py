"""One small loader per model format; the handler picks one by ``model.format``.

    eager         model file + state_dict (fp32, pruned, distilled models)
    int8_dynamic  Linear layers quantized to int8 (torch.ao dynamic quantization)
    int8_static   convolutions and Linear layers int8 (FX graph mode, x86 backend)
    half          state_dict in float16 or bfloat16; inputs are cast, outputs come back fp32
    onnx          an ONNX file run by ONNX Runtime (CUDA provider on a GPU worker)
    exported      a torch.export program: no Python model code in the archive

Every loader returns a :class:`Loaded`: a callable from the model's inputs (float32 numbers,
or integer token ids; on the device it names) to float32 outputs, and where it really
computes, which the worker logs once.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .config import ModelOptions
from .errors import ModelLoadError
from .runtime import build_module, load_eager_model, load_weights_into

Model = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Loaded:
    """A loaded model, the device its inputs go to, and what actually runs it."""

    run: Model
    #: where the handler puts input batches (the CPU for ONNX Runtime, which copies them itself)
    inputs_on: torch.device
    #: what computes, for the worker's log: "torch float16 on cuda:0", "onnxruntime CPUExecutionProvider"
    engine: str
    #: False where there is no autograd (quantized kernels, ONNX Runtime): no explanations
    differentiable: bool = True
    #: why it runs elsewhere than the worker's device, if it does
    note: str = ""

    def describe(self) -> str:
        return f"{self.engine} ({self.note})" if self.note else self.engine

    @property
    def module(self) -> nn.Module | None:
        """The torch module that computes, where there is one (explanations that attribute a layer need it)."""
        return self.run if isinstance(self.run, nn.Module) else None


Loader = Callable[[Path, Mapping[str, Any], ModelOptions, torch.device, int], Loaded]

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@contextmanager
def quiet_quantization() -> Iterator[None]:
    """torch.ao.quantization still works in torch 2.13 but warns on every call; say it once, in the docs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        yield


def _files(model_dir: Path, manifest: Mapping[str, Any]) -> tuple[Path, Path]:
    entry = manifest.get("model", {})
    return model_dir / entry.get("modelFile", ""), model_dir / entry.get("serializedFile", "")


def _module(model_dir: Path, manifest: Mapping[str, Any], model: ModelOptions) -> nn.Module:
    model_file, _ = _files(model_dir, manifest)
    return build_module(model_file, model.class_name or "", model.kwargs).eval()


def _load_into(model: nn.Module, weights: Path, what: str) -> nn.Module:
    with quiet_quantization():
        return load_weights_into(model, weights, f"the {what} model")


def _on_torch(module: nn.Module, device: torch.device, dtype: str = "float32") -> Loaded:
    return Loaded(module, device, f"torch {dtype} on {device}")


def _int8(module: nn.Module, kind: str) -> Loaded:
    # Quantized kernels have no autograd: explanations must say so, not crash.
    return Loaded(module, torch.device("cpu"), f"torch {kind} on cpu", differentiable=False)


def load_eager(model_dir: Path, manifest: Mapping[str, Any], model: ModelOptions, device: torch.device, threads: int = 0) -> Loaded:
    model_file, weights = _files(model_dir, manifest)
    return _on_torch(load_eager_model(model_file, model.class_name or "", model.kwargs, weights, device), device)


def quantize_dynamic_int8(model: nn.Module) -> nn.Module:
    """Linear layers to int8 weights with dynamically quantized activations."""
    with quiet_quantization():
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8)


def load_int8_dynamic(model_dir: Path, manifest: Mapping[str, Any], model: ModelOptions, device: torch.device, threads: int = 0) -> Loaded:
    # Quantized kernels are CPU kernels: a GPU worker still runs this variant on its CPU.
    _, weights = _files(model_dir, manifest)
    return _int8(_load_into(quantize_dynamic_int8(_module(model_dir, manifest, model)), weights, "int8 dynamic"), "int8 dynamic")


def prepare_static_int8(model: nn.Module, sample_shape: tuple[int, ...]) -> nn.Module:
    """The FX-traced model with observers (x86 backend), ready for calibration."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    with quiet_quantization():
        return prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"), (torch.zeros(sample_shape),))


def convert_static_int8(prepared: nn.Module) -> nn.Module:
    from torch.ao.quantization.quantize_fx import convert_fx

    with quiet_quantization():
        return convert_fx(prepared)


def load_int8_static(model_dir: Path, manifest: Mapping[str, Any], model: ModelOptions, device: torch.device, threads: int = 0) -> Loaded:
    _, weights = _files(model_dir, manifest)
    shape = model.sample_shape
    # Same tracing and conversion as at build time gives the same module structure;
    # the archive's state_dict then supplies the int8 weights, scales and zero points.
    structure = convert_static_int8(prepare_static_int8(_module(model_dir, manifest, model), shape))
    return _int8(_load_into(structure, weights, "int8 static"), "int8 static")


def load_half(model_dir: Path, manifest: Mapping[str, Any], model: ModelOptions, device: torch.device, threads: int = 0) -> Loaded:
    """Weights, activations and inputs in float16/bfloat16 end to end; only the outputs come back float32."""
    _, weights = _files(model_dir, manifest)
    name = model.dtype or "float16"
    dtype = DTYPES[name]
    module = _load_into(_module(model_dir, manifest, model).to(dtype), weights, name).to(device)

    def run(*inputs: torch.Tensor) -> torch.Tensor:
        # Numbers are cast; integer inputs (token ids, masks) are indices, not values: they stay.
        return module(*[t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device) for t in inputs]).float()

    return Loaded(run, device, f"torch {name} on {device}")


ONNX_GPU_HINT = "pip install onnxruntime-gpu (in place of onnxruntime) for ONNX on the GPU"


def onnx_providers(device: torch.device, available: list[str]) -> tuple[list[Any], str]:
    """ONNX Runtime providers for a worker on ``device``, and why the GPU is not among them, if it is not."""
    if device.type != "cuda":
        return ["CPUExecutionProvider"], ""
    if "CUDAExecutionProvider" not in available:
        return ["CPUExecutionProvider"], f"GPU {device.index} left unused: this host's onnxruntime has no CUDAExecutionProvider; {ONNX_GPU_HINT}"
    return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"], ""


def load_onnx(model_dir: Path, manifest: Mapping[str, Any], model: ModelOptions, device: torch.device, threads: int = 0) -> Loaded:
    try:
        import onnxruntime as ort
    except ImportError:
        raise ModelLoadError("this archive needs onnxruntime on the TorchServe host: pip install onnxruntime") from None
    _, weights = _files(model_dir, manifest)
    settings = ort.SessionOptions()
    settings.intra_op_num_threads = threads
    settings.inter_op_num_threads = 1
    providers, note = onnx_providers(device, ort.get_available_providers())
    try:
        session = ort.InferenceSession(str(weights), sess_options=settings, providers=providers)
    except Exception as err:  # onnxruntime raises its own exception types
        raise ModelLoadError(f"ONNX Runtime cannot load {weights.name}: {err}") from err
    used = session.get_providers()[0]
    if not note and device.type == "cuda" and used != "CUDAExecutionProvider":
        # ONNX Runtime falls back quietly when the CUDA provider's libraries do not load.
        note = f"GPU {device.index} left unused: CUDAExecutionProvider did not start (CUDA/cuDNN libraries?), ONNX Runtime fell back to {used}"
    names = [i.name for i in session.get_inputs()]

    def run(*inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) != len(names):
            raise ValueError(f"the ONNX graph takes {len(names)} inputs ({', '.join(names)}), the handler gave {len(inputs)}")
        return torch.from_numpy(session.run(None, {n: t.detach().cpu().numpy() for n, t in zip(names, inputs, strict=True)})[0])

    where = f"GPU {device.index}" if used == "CUDAExecutionProvider" else "cpu"
    return Loaded(run, torch.device("cpu"), f"onnxruntime {used} on {where}, float32", differentiable=False, note=note)


def load_exported(model_dir: Path, manifest: Mapping[str, Any], model: ModelOptions, device: torch.device, threads: int = 0) -> Loaded:
    _, weights = _files(model_dir, manifest)
    try:
        program = torch.export.load(str(weights))
    except Exception as err:
        raise ModelLoadError(f"{weights.name} is not a loadable torch.export program: {err}") from err
    return _on_torch(program.module().to(device), device)


#: how far a sped-up model's outputs may move from the model as loaded, relative to the largest output
SPEED_UP_TOLERANCE = 1e-3


def speed_up(loaded: Loaded, model: ModelOptions, fold_batchnorm: bool, channels_last: bool, sample: tuple[torch.Tensor, ...]) -> Loaded:
    """The eager model with its BatchNorms folded into the layers before them and/or in channels-last memory.

    Both are what oneDNN runs fastest for convolutional networks on a CPU (and cuDNN on a GPU): on
    2 cores, ResNet-18 at 224x224 in batches of 8 takes 24.5 ms an image as loaded, 17.6 folded and
    channels-last (docs/benchmarks.md). They change the last digits of the outputs, so the result is
    compared with the model as loaded on a seeded random batch shaped like ``sample`` and refused
    beyond ``SPEED_UP_TOLERANCE``. Only ``eager`` models (fp32, pruned, distilled) are changed: a
    variant inheriting the options (int8, ONNX, ...) keeps its own optimisations.

    Raises:
        ModelLoadError: torch.fx cannot trace the model, or the result does not compute the same numbers.
    """
    module = loaded.module
    if not (fold_batchnorm or channels_last) or model.format != "eager" or module is None:
        return loaded
    faster: nn.Module = module
    if fold_batchnorm:
        from torch.fx.experimental.optimization import fuse

        try:
            faster = fuse(module)  # a copy: the original stays the reference below
        except Exception as err:  # symbolic tracing raises whatever the model's forward does with proxies
            raise ModelLoadError(f"handler.fold_batchnorm: torch.fx cannot trace {type(module).__name__} ({type(err).__name__}: {err}); "
                                 "set fold_batchnorm: false") from err
    if channels_last:
        faster = (faster if faster is not module else copy.deepcopy(module)).to(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(0)
    probe = tuple(torch.randn(t.shape, generator=generator).to(t.device) if t.is_floating_point() else t for t in sample)
    try:
        with torch.inference_mode():
            expected, got = module(*probe), faster(*probe)
    except Exception as err:  # the model's own code, on inputs it has not seen before
        raise ModelLoadError(f"handler.fold_batchnorm/channels_last: the model fails on a random sample batch: {err}") from err
    expected, got = getattr(expected, "logits", expected), getattr(got, "logits", got)  # a Hugging Face ModelOutput
    if isinstance(expected, torch.Tensor) and isinstance(got, torch.Tensor):
        scale = max(float(expected.abs().max()), 1.0)
        moved = float((got.float() - expected.float()).abs().max())
        if not moved <= SPEED_UP_TOLERANCE * scale:  # also refuses NaN
            raise ModelLoadError(f"handler.fold_batchnorm/channels_last change the model's outputs by {moved:.3g} (allowed "
                                 f"{SPEED_UP_TOLERANCE * scale:.3g}): set them to false")
    done = " and ".join(name for name, on in (("BatchNorm folded", fold_batchnorm), ("channels-last", channels_last)) if on)
    return Loaded(faster, loaded.inputs_on, f"{loaded.engine}, {done}", loaded.differentiable, loaded.note)


Placement = Literal["torch", "cpu", "onnxruntime"]


@dataclass(frozen=True)
class Format:
    """A model format: its loader and where it may compute.

    ``torch`` follows the worker's device; ``cpu`` never leaves the CPU (torch.ao's quantized
    kernels cannot take CUDA tensors) and never asks CUDA anything; ``onnxruntime`` is given
    the worker's GPU and picks its own provider, with inputs handed over on the CPU.
    """

    load: Loader
    placement: Placement = "torch"


FORMATS: dict[str, Format] = {
    "eager": Format(load_eager),
    "int8_dynamic": Format(load_int8_dynamic, "cpu"),
    "int8_static": Format(load_int8_static, "cpu"),
    "half": Format(load_half),
    "onnx": Format(load_onnx, "onnxruntime"),
    "exported": Format(load_exported),
}

#: Formats whose kernels exist for the CPU only: a GPU worker runs them on its CPU.
CPU_ONLY_FORMATS = frozenset(name for name, fmt in FORMATS.items() if fmt.placement == "cpu")


def model_format(name: str) -> Format:
    """The format ``model.format`` names."""
    if name not in FORMATS:
        raise ModelLoadError(f"model.format {name!r} is not one of {sorted(FORMATS)}")
    return FORMATS[name]


def load_model(model_dir: Path, manifest: Mapping[str, Any], model: ModelOptions, device: torch.device, threads: int = 0) -> Loaded:
    """Load the archive's model with the loader its ``model.format`` names.

    Args:
        model_dir: the unpacked archive.
        manifest: its ``MAR-INF/MANIFEST.json`` (names the model file and weights).
        model: the ``model:`` section of its model-config.yaml.
        device: the worker's device.
        threads: torch threads per worker (an ONNX Runtime session gets as many; 0: its default).
    """
    return model_format(model.format).load(model_dir, manifest, model, device, threads)
