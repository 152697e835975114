"""Small pieces a handler needs at load time: device, threads, model loading.

Each is a plain function so the archiver can run the very same loading code
at build time that a worker runs at start-up.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from .errors import ModelLoadError

logger = logging.getLogger(__name__)


def machine() -> str:
    """Where numbers were measured: CPU architecture, cores, OS and torch version."""
    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, torch {torch.__version__}"


def select_device(gpu_id: int | None, placement: str = "torch") -> tuple[torch.device, str]:
    """The device a worker gives its model, and why its GPU goes unused, if it does.

    TorchServe hands a GPU worker ``gpu_id``. A ``cpu`` placement (CPU-only kernels) gets the CPU
    without asking CUDA anything, so no CUDA context is made; ``onnxruntime`` gets the GPU
    without torch touching CUDA (ONNX Runtime picks its provider); ``torch`` gets it when
    this torch has CUDA.
    """
    if gpu_id is None:
        return torch.device("cpu"), ""
    if placement == "cpu":
        return torch.device("cpu"), f"GPU {gpu_id} left unused: this format's kernels run on the CPU only"
    if placement == "onnxruntime" or torch.cuda.is_available():
        return torch.device(f"cuda:{int(gpu_id)}"), ""
    return torch.device("cpu"), f"GPU {gpu_id} left unused: this torch ({torch.__version__}) has no CUDA"


def default_threads(model_config: Mapping[str, Any]) -> int:
    """Share the cores among the model's workers (TorchServe never limits torch threads)."""
    workers = max(int(model_config.get("maxWorkers") or model_config.get("minWorkers") or 1), 1)
    return max((os.cpu_count() or 1) // workers, 1)


def worker_threads(model_config: Mapping[str, Any], torch_threads: int | None, batch_size: int | None = None) -> int:
    """Torch threads for one worker: ``handler.torch_threads``, else the cores shared among the workers.

    Threads beyond a worker's share of the cores pay only when batches keep them busy (``ts-archive tune`` may
    pick two workers of two threads on 2 cores for a model that computes in batches). A host that hands the
    worker one request at a time (a plain TorchServe reading ``batchSize: 1``) gets the share instead: at batch
    1 the oversubscribed threads spin-wait for each other (ResNet-18, 2 workers on 2 cores, 64 clients: 17
    req/s with 2 threads each, 35 with 1)."""
    share = default_threads(model_config)
    threads = torch_threads or share
    return share if batch_size == 1 and threads > share else threads


def limit_threads(threads: int) -> None:
    """Cap torch's intra-op threads (and inter-op, when still allowed) for this process."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only settable before the first parallel work; harmless to skip
        pass


def import_file(path: Path) -> ModuleType:
    """Import a model source file by path under a private module name."""
    if not path.is_file():
        raise ModelLoadError(f"model file {path} does not exist")
    name = f"_served_model_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelLoadError(f"model file {path} is not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise ModelLoadError(f"importing model file {path} failed: {type(err).__name__}: {err}") from err
    return module


def module_class(model_file: Path, class_name: str) -> type[nn.Module]:
    """The ``torch.nn.Module`` subclass named ``class_name`` in ``model_file``."""
    cls = getattr(import_file(model_file), class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ModelLoadError(f"model file {model_file.name} defines no torch.nn.Module named {class_name!r}")
    return cls


def forward_parameters(model_file: Path, class_name: str) -> list[str]:
    """The names of the parameters of the class's ``forward``, ``self`` left out."""
    return [name for name in inspect.signature(module_class(model_file, class_name).forward).parameters if name != "self"]


def build_module(model_file: Path, class_name: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """Instantiate ``class_name`` from ``model_file`` with ``kwargs``."""
    cls = module_class(model_file, class_name)
    try:
        return cls(**dict(kwargs))
    except TypeError as err:
        raise ModelLoadError(f"{class_name}(**{dict(kwargs)}) failed: {err}") from err


def load_state_dict(weights: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Load a state_dict safely: ``weights_only=True`` refuses pickled code."""
    if not weights.is_file():
        raise ModelLoadError(f"weights file {weights} does not exist")
    try:
        state = torch.load(weights, map_location=device, weights_only=True)
    except Exception as err:
        raise ModelLoadError(f"weights file {weights.name} is not a loadable state_dict: {err}") from err
    # Quantized state_dicts also hold dtypes and packed (weight, bias) tuples next to tensors.
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ModelLoadError(f"weights file {weights.name} holds a {type(state).__name__}, expected a state_dict (name -> tensor)")
    return state


def load_eager_model(
    model_file: Path,
    class_name: str,
    kwargs: Mapping[str, Any],
    weights: Path,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Build the model class, load its state_dict strictly, and put it in eval mode on ``device``."""
    model = build_module(model_file, class_name, kwargs)
    return load_weights_into(model, weights, class_name, device).to(device)


def load_weights_into(model: nn.Module, weights: Path, what: str, device: torch.device | str = "cpu") -> nn.Module:
    """Load ``weights`` into ``model`` strictly; a mismatch names the file, ``what`` it should fit, and the keys."""
    state = load_state_dict(weights, device)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())
        raise ModelLoadError(f"weights file {weights.name} does not fit {what}: {detail}") from err
    return model.eval()
