"""TorchServe handler for models that take rows of numbers (``handler: {entry: tabular}``).

Request:  {"inputs": [x1, ..., xN]}  or  {"inputs": [[...], [...]]}
Response: {"predictions": [[y, ...], ...]}  one entry per input row, in order.
KServe v1: {"instances": [[...], ...]} -> {"predictions": [...]}; Open Inference Protocol v2: one
numeric input of shape [rows, N] (or [N]) -> output "predictions" of shape [rows, outputs].
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from . import protocols
from .base import BatchHandler, Decoded
from .config import ModelOptions, TabularOptions
from .errors import ConfigError, InvalidInput
from .payload import decode_json, json_field, parse_rows, request_body


class TabularHandler(BatchHandler):
    """Rows of ``input_width`` numbers in, one prediction row per input row out."""

    options_type = TabularOptions
    options: TabularOptions

    @classmethod
    def check(cls, options: TabularOptions, model: ModelOptions) -> None:
        if len(model.sample_shape) != 2:
            raise ConfigError(f"model.sample_shape must be [rows, features] for tabular handlers, got {list(model.sample_shape)}")
        if options.input_width is not None and options.input_width != model.sample_shape[1]:
            raise ConfigError(f"handler.input_width {options.input_width} differs from model.sample_shape {list(model.sample_shape)}: rows of {model.sample_shape[1]} numbers")

    @property
    def width(self) -> int:
        """Numbers per row: ``input_width``, else the model's sample shape."""
        assert self.model_options is not None, "initialize() was not called"
        return self.options.input_width or self.model_options.sample_shape[1]

    def decode(self, request: Mapping[str, Any], headers: Mapping[str, str]) -> Decoded:
        width = self.width
        inputs = json_field(decode_json(request_body(request)), "inputs", f'{{"inputs": [{width} numbers]}}')
        return Decoded(parse_rows(inputs, width, self.options.max_rows))

    def decode_instances(self, instances: list[Any], headers: Mapping[str, str]) -> Decoded:
        return Decoded(parse_rows(instances, self.width, self.options.max_rows))

    def decode_tensor(self, tensor: protocols.Tensor, headers: Mapping[str, str]) -> Decoded:
        width = self.width
        if tensor.numbers is None or tensor.shape[-1] != width or len(tensor.shape) > 2:
            raise InvalidInput(f"v2: input {tensor.name!r} must be numbers of shape [rows, {width}] (or [{width}]), got {tensor.datatype} {list(tensor.shape)}")
        rows = tensor.numbers.reshape(-1, width)
        if rows.shape[0] > self.options.max_rows:
            raise InvalidInput(f"v2: input {tensor.name!r} has {rows.shape[0]} rows, more than the limit of {self.options.max_rows} rows per request")
        if rows.shape[0] == 0:
            raise InvalidInput(f"v2: input {tensor.name!r} has no rows")
        return Decoded(rows)

    def encode(self, item: Decoded, outputs: torch.Tensor) -> dict[str, Any]:
        return {"predictions": outputs.tolist()}
