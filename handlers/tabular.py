"""TorchServe entry point for models that take rows of numbers.

Request:  {"inputs": [x1, ..., xN]}  or  {"inputs": [[...], [...]]}
Response: {"predictions": [[y, ...], ...]}  one entry per input row, in order.

TorchServe's loader wants exactly one class defined in this module, so every
helper lives in other modules of the ``handlers`` package.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from handlers.base import BatchHandler, Decoded
from handlers.payload import decode_json, json_field, parse_rows, request_body


class TabularHandler(BatchHandler):
    """Rows of ``input_width`` numbers in, one prediction row per input row out."""

    def decode(self, request: Mapping[str, Any], headers: Mapping[str, str]) -> Decoded:
        width = int(self.options.get("input_width", 0))
        example = f'{{"inputs": [{width} numbers]}}'
        inputs = json_field(decode_json(request_body(request)), "inputs", example)
        rows = parse_rows(inputs, width, int(self.options.get("max_rows", 1024)))
        return Decoded(rows)

    def encode(self, item: Decoded, outputs: torch.Tensor) -> dict[str, Any]:
        return {"predictions": outputs.tolist()}
