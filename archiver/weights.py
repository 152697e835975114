"""What a weights file holds, as tensors, whatever its format (for parameter counts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from serveready.handlers.loaders import quiet_quantization


def state_dict_tensors(path: Path) -> list[torch.Tensor]:
    """A state_dict's weights; quantized ones' scales and zero points are not parameters."""
    with quiet_quantization():
        state = torch.load(path, map_location="cpu", weights_only=True)
    return [t for key, value in state.items() if not key.endswith(("scale", "zero_point")) for t in _tensors(value)]


def onnx_tensors(path: Path) -> list[torch.Tensor]:
    """An ONNX graph's initializers."""
    import onnx
    from onnx import numpy_helper

    return [torch.from_numpy(numpy_helper.to_array(t).copy()) for t in onnx.load(str(path)).graph.initializer]


def program_tensors(path: Path) -> list[torch.Tensor]:
    """A torch.export program's state_dict."""
    return list(torch.export.load(str(path)).state_dict.values())


def count(tensors: list[torch.Tensor]) -> tuple[int, int]:
    """(parameters, non-zero parameters); int8 tensors are counted by their integer values."""
    total = sum(t.numel() for t in tensors)
    nonzero = sum(int(torch.count_nonzero(t.int_repr() if t.is_quantized else t)) for t in tensors)
    return total, nonzero


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []
