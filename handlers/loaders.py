"""One small loader per model format; the handler picks one by ``model.format``.

    eager         model file + state_dict (fp32, pruned, distilled models)
    int8_dynamic  Linear layers quantized to int8 (torch.ao dynamic quantization)
    int8_static   convolutions and Linear layers int8 (FX graph mode, x86 backend)
    half          state_dict in float16 or bfloat16; inputs are cast, outputs come back fp32
    onnx          an ONNX file run by ONNX Runtime (CUDA provider on a GPU worker)
    exported      a torch.export program: no Python model code in the archive

Every loader returns a callable from a float32 batch to float32 outputs.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ModelOptions
from .errors import ModelLoadError
from .runtime import build_module, load_eager_model, load_weights_into

Model = Callable[[torch.Tensor], torch.Tensor]
Loader = Callable[[Path, Mapping[str, Any], ModelOptions, torch.device, int], Model]

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


def _no_gradients(model: Model) -> Model:
    # Quantized kernels and ONNX Runtime have no autograd: explanations must say so, not crash.
    model.differentiable = False  # type: ignore[attr-defined]
    return model


def load_eager(model_dir: Path, manifest: Mapping[str, Any], model: ModelOptions, device: torch.device, threads: int = 0) -> Model:
    model_file, weights = _files(model_dir, manifest)
    return load_eager_model(model_file, model.class_name or "", model.kwargs, weights, device)


def quantize_dynamic_int8(model: nn.Module) -> nn.Module:
    """Linear layers to int8 weights with dynamically quantized activations."""
    with quiet_quantization():
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8)


def load_int8_dynamic(model_dir: Path, manifest: Mapping[str, Any], model: ModelOptions, device: torch.device, threads: int = 0) -> Model:
    # Quantized kernels are CPU kernels: a GPU worker still runs this variant on its CPU.
    _, weights = _files(model_dir, manifest)
    return _no_gradients(_load_into(quantize_dynamic_int8(_module(model_dir, manifest, model)), weights, "int8 dynamic"))


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


def load_int8_static(model_dir: Path, manifest: Mapping[str, Any], model: ModelOptions, device: torch.device, threads: int = 0) -> Model:
    _, weights = _files(model_dir, manifest)
    shape = model.sample_shape
    # Same tracing and conversion as at build time gives the same module structure;
    # the archive's state_dict then supplies the int8 weights, scales and zero points.
    structure = convert_static_int8(prepare_static_int8(_module(model_dir, manifest, model), shape))
    return _no_gradients(_load_into(structure, weights, "int8 static"))


def load_half(model_dir: Path, manifest: Mapping[str, Any], model: ModelOptions, device: torch.device, threads: int = 0) -> Model:
    _, weights = _files(model_dir, manifest)
    name = model.dtype or "float16"
    dtype = DTYPES[name]
    module = _load_into(_module(model_dir, manifest, model).to(dtype), weights, name).to(device)

    def run(batch: torch.Tensor) -> torch.Tensor:
        return module(batch.to(device=device, dtype=dtype)).float()

    return run


def load_onnx(model_dir: Path, manifest: Mapping[str, Any], model: ModelOptions, device: torch.device, threads: int = 0) -> Model:
    try:
        import onnxruntime as ort
    except ImportError:
        raise ModelLoadError("this archive needs onnxruntime on the TorchServe host: pip install onnxruntime") from None
    _, weights = _files(model_dir, manifest)
    settings = ort.SessionOptions()
    settings.intra_op_num_threads = threads
    settings.inter_op_num_threads = 1
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
    try:
        session = ort.InferenceSession(str(weights), sess_options=settings, providers=providers)
    except Exception as err:  # onnxruntime raises its own exception types
        raise ModelLoadError(f"ONNX Runtime cannot load {weights.name}: {err}") from err
    name = session.get_inputs()[0].name

    def run(batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: batch.detach().cpu().numpy()})[0])

    return _no_gradients(run)


def load_exported(model_dir: Path, manifest: Mapping[str, Any], model: ModelOptions, device: torch.device, threads: int = 0) -> Model:
    _, weights = _files(model_dir, manifest)
    try:
        program = torch.export.load(str(weights))
    except Exception as err:
        raise ModelLoadError(f"{weights.name} is not a loadable torch.export program: {err}") from err
    return program.module().to(device)


LOADERS: dict[str, Loader] = {
    "eager": load_eager,
    "int8_dynamic": load_int8_dynamic,
    "int8_static": load_int8_static,
    "half": load_half,
    "onnx": load_onnx,
    "exported": load_exported,
}


#: Formats whose kernels exist for the CPU only (torch.ao's quantized ops cannot take CUDA
#: tensors): a GPU worker runs them on its CPU, without touching CUDA.
CPU_ONLY_FORMATS = frozenset({"int8_dynamic", "int8_static"})


def load_model(model_dir: Path, manifest: Mapping[str, Any], model: ModelOptions, device: torch.device, threads: int = 0) -> Model:
    """Load the archive's model with the loader its ``model.format`` names.

    Args:
        model_dir: the unpacked archive.
        manifest: its ``MAR-INF/MANIFEST.json`` (names the model file and weights).
        model: the ``model:`` section of its model-config.yaml.
        device: the worker's device.
        threads: torch threads per worker (an ONNX Runtime session gets as many; 0: its default).
    """
    if model.format not in LOADERS:
        raise ModelLoadError(f"model.format {model.format!r} is not one of {sorted(LOADERS)}")
    return LOADERS[model.format](model_dir, manifest, model, device, threads)
