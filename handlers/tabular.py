"""Models that take rows of numbers (``handler: {entry: tabular}``).

Request:  {"inputs": [x1, ..., xN]}  or  {"inputs": [[...], [...]]}
Response: {"predictions": [[y, ...], ...]}  one entry per input row, in order.
KServe v1: {"instances": [[...], ...]} -> {"predictions": [...]}; Open Inference Protocol v2: one
numeric input of shape [rows, N] (or [N]) -> output "predictions" of shape [rows, outputs].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .base import BatchHandler, Decoded
from .config import ModelOptions, TabularOptions
from .errors import ConfigError, InvalidInput
from .payload import Request, json_field, parse_rows


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
        return self.options.input_width or self.model_options.sample_shape[1]

    @property
    def max_instances(self) -> int:  # type: ignore[override]
        return self.options.max_rows

    def decode(self, request: Request) -> Decoded:
        inputs = json_field(request.json(), "inputs", f'{{"inputs": [{self.width} numbers]}}')
        return Decoded(parse_rows(inputs, self.width, self.options.max_rows))

    def decode_instances(self, values: Sequence[Any] | torch.Tensor, request: Request) -> Decoded:
        if not isinstance(values, torch.Tensor):
            return Decoded(parse_rows(list(values), self.width, self.options.max_rows))
        width = self.width
        if values.shape[-1] != width or values.ndim > 2:
            raise InvalidInput(f"expected numbers of shape [rows, {width}] (or [{width}]), got {list(values.shape)}")
        rows = values.reshape(-1, width)
        if rows.shape[0] > self.options.max_rows:
            raise InvalidInput(f"{rows.shape[0]} rows, more than the limit of {self.options.max_rows} rows per request")
        return Decoded(rows)

    def encode(self, item: Decoded, outputs: torch.Tensor) -> dict[str, Any]:
        return {"predictions": outputs.tolist()}
