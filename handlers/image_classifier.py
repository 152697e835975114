"""TorchServe entry point for the 8x8 digits classifier (or any small image classifier).

Request, one image each:
    raw PNG/JPEG body                      (curl --data-binary @digit.png)
    {"image": "<base64 PNG/JPEG>", "k": 3}
    {"inputs": [[8 numbers] x 8], "k": 3}  ink counts 0..16, as sklearn's digits.images
    an ``X-Top-K: 5`` request header also sets k (the only way for a raw image body).
Response: {"predictions": [{"class": "3", "index": 3, "probability": 0.98}, ...]}  top k.
/explanations adds "input" (the 8x8 the model saw, 0..1) and "attributions" (8x8).

TorchServe's loader wants exactly one class defined in this module.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch

from handlers.base import BatchHandler, Decoded
from handlers.errors import InvalidInput, ModelLoadError
from handlers.images import GRID, decode_base64, open_image, to_digit_grid
from handlers.payload import decode_json, parse_rows, request_body

INK_MAX = 16.0
#: Raw image bodies carry k in this header (TorchServe 0.12 drops query strings of predictions).
TOP_K_HEADER = "x-top-k"  # the digits data set's largest ink count per block


class ImageClassifierHandler(BatchHandler):
    """One image per request in, its top-k classes with probabilities out."""

    def initialize(self, context: Any) -> None:
        super().initialize(context)
        path = self.model_dir / str(self.options.get("classes_file", "index_to_name.json"))
        try:
            mapping = json.loads(path.read_text())
            self.names = [str(mapping[str(i)]) for i in range(len(mapping))]
        except (OSError, ValueError, KeyError) as err:
            raise ModelLoadError(f"class names file {path.name} is missing or not an index -> name mapping: {err}") from err

    def decode(self, request: Mapping[str, Any], headers: Mapping[str, str]) -> Decoded:
        body = request_body(request)
        k = headers.get(TOP_K_HEADER)
        if isinstance(body, (bytes, bytearray)) and not bytes(body[:64]).lstrip().startswith(b"{"):
            grid = self._image(bytes(body))
        else:
            document = decode_json(body)
            if not isinstance(document, dict) or not ({"image", "inputs"} & set(document)):
                raise InvalidInput('send a PNG/JPEG body, or JSON {"image": "<base64>"} or {"inputs": [[8 numbers] x 8]}')
            k = document.get("k", k)
            grid = self._image(decode_base64(document["image"])) if "image" in document else _ink_grid(document["inputs"])
        return Decoded(grid.reshape(1, 1, GRID, GRID), {"k": self._k(k)})

    def encode(self, item: Decoded, outputs: torch.Tensor) -> dict[str, Any]:
        probabilities = torch.softmax(outputs[0], dim=0)
        top = torch.topk(probabilities, item.options["k"])
        return {
            "predictions": [
                {"class": self.names[i], "index": i, "probability": p}
                for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
            ]
        }

    def encode_explanation(self, item: Decoded, outputs: torch.Tensor, attributions: torch.Tensor) -> dict[str, Any]:
        return {
            **self.encode(item, outputs),
            "input": item.rows.reshape(GRID, GRID).tolist(),
            "attributions": attributions.reshape(GRID, GRID).tolist(),
        }

    def _image(self, data: bytes) -> torch.Tensor:
        return to_digit_grid(open_image(data, int(self.options.get("max_pixels", 25_000_000))))

    def _k(self, value: Any) -> int:
        default, classes = int(self.options.get("top_k", 3)), len(self.names)
        if value is None:
            return min(default, classes)
        if isinstance(value, (bytes, bytearray)):
            value = bytes(value).decode("utf-8", "replace")
        try:
            k = int(value)
        except (TypeError, ValueError):
            k = 0
        if isinstance(value, bool) or isinstance(value, float) or not 1 <= k <= classes:
            raise InvalidInput(f"k must be a whole number from 1 to {classes}, got {value!r}")
        return k


def _ink_grid(inputs: Any) -> torch.Tensor:
    rows = parse_rows(inputs, width=GRID, max_rows=max(GRID, len(inputs) if isinstance(inputs, list) else 0))
    if rows.shape[0] != GRID:
        raise InvalidInput(f"'inputs' must be {GRID} rows of {GRID} numbers, got {rows.shape[0]} row(s)")
    low, high = rows.min().item(), rows.max().item()
    if low < 0 or high > INK_MAX:
        raise InvalidInput(f"'inputs' values must be ink counts from 0 to {INK_MAX:g}, got {low:g} to {high:g}")
    return rows / INK_MAX
