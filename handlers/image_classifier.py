"""Image classifiers (``handler: {entry: image_classifier}``): one image in, its top-k classes out.

Request, one image each:
    raw PNG/JPEG body                      (curl --data-binary @cat.png)
    {"image": "<base64 PNG/JPEG>", "k": 3}
    {"inputs": <channels x height x width numbers (height x width for grey models)>, "k": 3}
        the model's input itself, already resized and normalised
    an ``X-Top-K: 5`` request header also sets k (the only way for a raw image body).
Response: {"predictions": [{"class": "cat", "index": 3, "probability": 0.98}, ...]}  top k.
/explanations adds "input" (what the model saw) and "attributions" (same shape).

KServe v1: {"instances": [each {"b64": "<base64 PNG/JPEG>"}, a base64 string, or an "inputs" value]}
    -> {"predictions": [top k per instance]}.
Open Inference Protocol v2: one input, BYTES of shape [n] (PNG/JPEG files: base64 strings in JSON,
raw bytes with the binary extension) or numbers of shape [n, *the "inputs" shape]
    -> output "probabilities", FP32 of shape [n, classes].

A subclass for images that need another conversion overrides :meth:`image_input` (a decoded
image -> the model's input) and :meth:`array_input` (what ``"inputs"`` holds -> the model's
input), as the digits example does (``examples/digits/digits_handler.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from .base import BatchHandler, Decoded
from .config import ImageOptions, ModelOptions
from .errors import ConfigError, InvalidInput
from .images import open_image, resized_size, standard_input
from .labels import class_names, requested_k, top_classes
from .payload import Request, decode_base64, parse_array

#: Raw image bodies carry k in this header (TorchServe 0.12 drops query strings of predictions).
TOP_K_HEADER = "x-top-k"


class ImageClassifierHandler(BatchHandler):
    """One image per request in, its top-k classes with probabilities out."""

    options_type: Any = ImageOptions
    heavy_decode = True
    options: ImageOptions

    @classmethod
    def check(cls, options: ImageOptions, model: ModelOptions) -> None:
        shape = list(model.sample_shape)
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

    def setup(self, sample_outputs: torch.Tensor) -> None:
        self.classes = int(sample_outputs.shape[-1])
        self.names = class_names(self.options, self.model_dir, self.classes)

    # -- what an image becomes (a subclass may convert otherwise) ----------------------
    def image_input(self, image: Image.Image) -> torch.Tensor:
        """A decoded image -> the model's input for it (torchvision's Resize, CenterCrop, ToTensor, Normalize)."""
        channels, height, width = self.input_shape
        o = self.options
        return standard_input(image, channels, (height, width), o.resize, o.crop, o.mean, o.std, o.max_pixels)

    def array_input(self, value: Any) -> torch.Tensor:
        """An ``"inputs"`` value -> the model's input: channels x height x width numbers (height x width for grey)."""
        channels, height, width = self.input_shape
        grey_2d = channels == 1 and isinstance(value, list) and len(value) == height and height != 1
        return parse_array(value, (height, width) if grey_2d else self.input_shape)

    @property
    def inputs_example(self) -> str:
        """What ``"inputs"`` holds, for messages."""
        return " x ".join(map(str, self.input_shape)) + " numbers"

    @property
    def explained_shape(self) -> tuple[int, ...]:
        """The shape of one image's ``input`` and ``attributions`` in an explanation."""
        return self.input_shape

    # -- requests ------------------------------------------------------------------
    def decode(self, request: Request) -> Decoded:
        body = request.body
        k = request.headers.get(TOP_K_HEADER)
        if isinstance(body, (bytes, bytearray)) and not bytes(body[:64]).lstrip().startswith(b"{"):
            rows = self._image(bytes(body))
        else:
            document = request.json()
            if not isinstance(document, dict) or not ({"image", "inputs"} & set(document)):
                raise InvalidInput(f'send a PNG/JPEG body, or JSON {{"image": "<base64>"}} or {{"inputs": {self.inputs_example}}}')
            k = document.get("k", k)
            rows = self._image(decode_base64(document["image"])) if "image" in document else self.array_input(document["inputs"])
        return Decoded(rows.reshape(1, *self.input_shape), {"k": self._k(k)}, single=True)

    def decode_instances(self, values: Sequence[Any] | torch.Tensor, request: Request) -> Decoded:
        rows = [self.decode_instance(v.tolist() if isinstance(v, torch.Tensor) else v) for v in values]
        return Decoded(torch.stack(rows), {"k": self._k(request.headers.get(TOP_K_HEADER))})

    def decode_instance(self, value: Any) -> torch.Tensor:
        """{"b64": ...} or a base64 string (an image file), a file's bytes (v2 binary BYTES), or an "inputs" value."""
        if isinstance(value, (bytes, bytearray)):
            return self._image(bytes(value)).reshape(self.input_shape)
        if isinstance(value, dict) and "b64" in value:
            value = value["b64"]
        elif isinstance(value, dict):
            raise InvalidInput('an instance is an object without "b64"; send {"b64": "<base64 PNG/JPEG>"}')
        if isinstance(value, str):
            return self._image(decode_base64(value, "an instance")).reshape(self.input_shape)
        return self.array_input(value).reshape(self.input_shape)

    def _image(self, data: bytes) -> torch.Tensor:
        return self.image_input(open_image(data, self.options.max_pixels))

    def _k(self, value: Any) -> int:
        return requested_k(value, self.options.top_k, self.classes)

    # -- answers ---------------------------------------------------------------------
    def encode_rows(self, outputs: torch.Tensor, item: Decoded) -> list[Any]:
        return top_classes(outputs, item.options["k"], self.names)

    def tensor_outputs(self, outputs: torch.Tensor, item: Decoded) -> dict[str, torch.Tensor]:
        return {"probabilities": torch.softmax(outputs, dim=1)}

    def explain_rows(self, item: Decoded, attributions: torch.Tensor) -> dict[str, list[Any]]:
        images = item.rows.shape[0]
        return {"input": item.rows.reshape(images, *self.explained_shape).tolist(),
                "attributions": attributions.reshape(images, *self.explained_shape).tolist()}


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
