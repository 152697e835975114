"""TorchServe handler for image classifiers (``handler: {entry: image_classifier}``).

Request, one image each:
    raw PNG/JPEG body                      (curl --data-binary @cat.png)
    {"image": "<base64 PNG/JPEG>", "k": 3}
    {"inputs": <the model's input for one image>, "k": 3}
        preprocess standard: channels x height x width numbers (height x width for grey models),
                             already resized and normalised
        preprocess digits:   8 rows of 8 ink counts 0..16, as sklearn's digits.images
                             (or the 64 of them in one list, as a row of digits.data)
    an ``X-Top-K: 5`` request header also sets k (the only way for a raw image body).
Response: {"predictions": [{"class": "cat", "index": 3, "probability": 0.98}, ...]}  top k.
/explanations adds "input" (what the model saw) and "attributions" (same shape).

KServe v1: {"instances": [each {"b64": "<base64 PNG/JPEG>"}, a base64 string, or an "inputs" value]}
    -> {"predictions": [top k per instance]}.
Open Inference Protocol v2: one input, BYTES of shape [n] (PNG/JPEG files: base64 strings in JSON,
raw bytes with the binary extension) or numbers of shape [n, *the "inputs" shape]
    -> output "probabilities", FP32 of shape [n, classes].
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from . import protocols
from .base import BatchHandler, Decoded
from .config import ImageOptions, ModelOptions
from .errors import ConfigError, InvalidInput, ModelLoadError
from .images import GRID, decode_base64, open_image, resized_size, standard_input, to_digit_grid
from .labels import read_class_names
from .payload import decode_json, parse_array, parse_rows, request_body

#: The digits data set's largest ink count per 4x4 block.
INK_MAX = 16.0
#: Raw image bodies carry k in this header (TorchServe 0.12 drops query strings of predictions).
TOP_K_HEADER = "x-top-k"
#: the most images one KServe v1 or v2 request may carry
MAX_IMAGES = 64


class ImageClassifierHandler(BatchHandler):
    """One image per request in, its top-k classes with probabilities out."""

    options_type = ImageOptions
    options: ImageOptions

    @classmethod
    def check(cls, options: ImageOptions, model: ModelOptions) -> None:
        shape = list(model.sample_shape)
        if options.preprocess == "digits":
            if shape[1:] != [1, GRID, GRID]:
                raise ConfigError(f"handler.preprocess 'digits' makes 1x8x8 inputs, but model.sample_shape is {shape}")
            return
        if len(shape) != 4 or shape[1] not in (1, 3):
            raise ConfigError(f"model.sample_shape must be [batch, channels (1 or 3), height, width] for image classifiers, got {shape}")
        channels, size = shape[1], (shape[2], shape[3])
        for key in ("mean", "std"):
            value = getattr(options, key)
            if value is not None and len(value) not in (1, channels):
                raise ConfigError(f"handler.{key} needs 1 or {channels} values for {channels}-channel inputs, got {list(value)}")
        final = _final_size(options, size)
        if final is None:
            raise ConfigError(f"handler.resize {list(options.resize or ())} keeps each image's aspect ratio: add crop: {list(size)} so every image becomes {size[0]}x{size[1]}")
        if final != size:
            raise ConfigError(f"handler.resize/crop make {final[0]}x{final[1]} images, but model.sample_shape {shape} takes {size[0]}x{size[1]}")

    @classmethod
    def check_outputs(cls, options: ImageOptions, model_dir: Path, outputs: torch.Tensor) -> None:
        class_names(options, model_dir, int(outputs.shape[-1]))

    def initialize(self, context: Any) -> None:
        super().initialize(context)
        self.classes = int(self.sample_outputs.shape[-1])
        self.names = class_names(self.options, self.model_dir, self.classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One image's model input: (channels, height, width)."""
        assert self.model_options is not None, "initialize() was not called"
        return tuple(self.model_options.sample_shape[1:])

    def decode(self, request: Mapping[str, Any], headers: Mapping[str, str]) -> Decoded:
        body = request_body(request)
        k = headers.get(TOP_K_HEADER)
        if isinstance(body, (bytes, bytearray)) and not bytes(body[:64]).lstrip().startswith(b"{"):
            rows = self._image(bytes(body))
        else:
            document = decode_json(body)
            if not isinstance(document, dict) or not ({"image", "inputs"} & set(document)):
                raise InvalidInput(f'send a PNG/JPEG body, or JSON {{"image": "<base64>"}} or {{"inputs": {self._inputs_example()}}}')
            k = document.get("k", k)
            rows = self._image(decode_base64(document["image"])) if "image" in document else self._inputs(document["inputs"])
        return Decoded(rows.reshape(1, *self.input_shape), {"k": self._k(k)})

    def decode_instances(self, instances: list[Any], headers: Mapping[str, str]) -> Decoded:
        rows = [self._instance(i, value) for i, value in enumerate(instances)]
        return Decoded(torch.stack(rows), {"k": self._k(headers.get(TOP_K_HEADER))})

    def decode_tensor(self, tensor: protocols.Tensor, headers: Mapping[str, str]) -> Decoded:
        limit = self.max_instances
        if tensor.shape[0] > limit or tensor.shape[0] == 0:
            raise InvalidInput(f"v2: input {tensor.name!r} must hold 1 to {limit} images, its shape is {list(tensor.shape)}")
        if tensor.numbers is None:
            if len(tensor.shape) != 1:
                raise InvalidInput(f"v2: input {tensor.name!r} of BYTES must have shape [images], got {list(tensor.shape)}")
            rows = [self._image(data).reshape(self.input_shape) for data in tensor.items]
        else:
            rows = [self._inputs(image.tolist()).reshape(self.input_shape) for image in tensor.numbers]
        return Decoded(torch.stack(rows), {"k": self._k(headers.get(TOP_K_HEADER))})

    def encode(self, item: Decoded, outputs: torch.Tensor) -> dict[str, Any]:
        return {"predictions": self._top(outputs[0], item.options["k"])}

    def encode_v1(self, item: Decoded, outputs: torch.Tensor) -> dict[str, Any]:
        return {"predictions": [self._top(row, item.options["k"]) for row in outputs]}

    def v2_outputs(self, item: Decoded, outputs: torch.Tensor) -> list[dict[str, Any]]:
        return [protocols.v2_output("probabilities", torch.softmax(outputs, dim=1))]

    @property
    def max_instances(self) -> int:
        return MAX_IMAGES

    def _top(self, logits: torch.Tensor, k: int) -> list[dict[str, Any]]:
        top = torch.topk(torch.softmax(logits, dim=0), k)
        return [{"class": self.names[i], "index": i, "probability": p} for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)]

    def _instance(self, index: int, value: Any) -> torch.Tensor:
        """One KServe v1 instance: {"b64": ...} or a base64 string (an image file), or an "inputs" value."""
        if isinstance(value, dict) and "b64" in value:
            value = value["b64"]
        elif isinstance(value, dict):
            raise InvalidInput(f'KServe v1: instance {index} is an object without "b64"; send {{"b64": "<base64 PNG/JPEG>"}}')
        if isinstance(value, str):
            return self._image(decode_base64(value)).reshape(self.input_shape)
        return self._inputs(value).reshape(self.input_shape)

    def encode_explanation(self, item: Decoded, outputs: torch.Tensor, attributions: torch.Tensor) -> dict[str, Any]:
        """One image: its top k, ``input`` and ``attributions``; KServe v1/v2's several: a list of each, per image."""
        shape = (GRID, GRID) if self.options.preprocess == "digits" else self.input_shape
        if item.protocol == protocols.OWN and item.rows.shape[0] == 1:
            return {**self.encode(item, outputs), "input": item.rows.reshape(shape).tolist(), "attributions": attributions.reshape(shape).tolist()}
        images = item.rows.shape[0]
        return {
            **self.encode_v1(item, outputs),
            "input": item.rows.reshape(images, *shape).tolist(),
            "attributions": attributions.reshape(images, *shape).tolist(),
        }

    def _image(self, data: bytes) -> torch.Tensor:
        image = open_image(data, self.options.max_pixels)
        if self.options.preprocess == "digits":
            return to_digit_grid(image)
        channels, height, width = self.input_shape
        o = self.options
        return standard_input(image, channels, (height, width), o.resize, o.crop, o.mean, o.std, o.max_pixels)

    def _inputs(self, inputs: Any) -> torch.Tensor:
        if self.options.preprocess == "digits":
            return _ink_grid(inputs)
        channels, height, width = self.input_shape
        grey_2d = channels == 1 and isinstance(inputs, list) and len(inputs) == height and height != 1
        return parse_array(inputs, (height, width) if grey_2d else self.input_shape)

    def _inputs_example(self) -> str:
        if self.options.preprocess == "digits":
            return f"[[{GRID} numbers] x {GRID}]"
        return " x ".join(map(str, self.input_shape)) + " numbers"

    def _k(self, value: Any) -> int:
        if value is None:
            return min(self.options.top_k, self.classes)
        if isinstance(value, (bytes, bytearray)):
            value = bytes(value).decode("utf-8", "replace")
        try:
            k = int(value)
        except (TypeError, ValueError):
            k = 0
        if isinstance(value, bool) or isinstance(value, float) or not 1 <= k <= self.classes:
            raise InvalidInput(f"k must be a whole number from 1 to {self.classes}, got {value!r}")
        return k


def class_names(options: ImageOptions, model_dir: Path, classes: int) -> list[str]:
    """The archive's class names (the indices when it has no names file), one per model output."""
    if options.classes_file is None:
        return [str(i) for i in range(classes)]
    names = read_class_names(model_dir / options.classes_file)
    if len(names) != classes:
        raise ModelLoadError(f"class names file {options.classes_file} names {len(names)} classes, the model has {classes} outputs")
    return names


def _final_size(options: ImageOptions, size: tuple[int, int]) -> tuple[int, int] | None:
    """The (height, width) every image ends up with, or None when it depends on the image."""
    if options.crop is not None:
        return options.crop[0], options.crop[-1]
    if options.resize is None:
        return size
    if len(options.resize) == 2:
        width, height = resized_size(1, 1, options.resize)
        return height, width
    return None


def _ink_grid(inputs: Any) -> torch.Tensor:
    if isinstance(inputs, list) and len(inputs) == GRID * GRID and not any(isinstance(v, list) for v in inputs):
        rows = parse_rows(inputs, width=GRID * GRID, max_rows=1).view(GRID, GRID)  # one row of sklearn's digits.data
    else:
        rows = parse_rows(inputs, width=GRID, max_rows=max(GRID, len(inputs) if isinstance(inputs, list) else 0))
    if rows.shape[0] != GRID:
        raise InvalidInput(f"'inputs' must be {GRID} rows of {GRID} numbers, got {rows.shape[0]} row(s)")
    low, high = rows.min().item(), rows.max().item()
    if low < 0 or high > INK_MAX:
        raise InvalidInput(f"'inputs' values must be ink counts from 0 to {INK_MAX:g}, got {low:g} to {high:g}")
    return rows / INK_MAX
