"""The digits model's handler: an uploaded image becomes scikit-learn's 8x8 ink grid, the way the data set was made.

``model_configs/digits.yaml`` names it (``handler: {entry: digits_handler.py}``), so the archive
carries this file; it subclasses the library's image classifier and says only what differs:

- :meth:`DigitsHandler.image_input`: scikit-learn's digits were made from 32x32 binary bitmaps,
  normalised so the digit's height fills the frame, by counting the ink pixels in each 4x4
  block (0..16). An upload goes the same way: find the paper and the ink (dark ink on light
  paper, or light on dark), crop to the ink, scale its height to 32 pixels, centre it in a
  32x32 frame, and take the ink fraction of each 4x4 block.
- :meth:`DigitsHandler.array_input`: ``{"inputs": ...}`` holds ink counts 0..16, as
  ``digits.images`` (8 rows of 8) or a row of ``digits.data`` (64 numbers).

Pillow and torch only, like the library's handlers: it runs on a TorchServe host that has neither
numpy nor this library.
"""

from __future__ import annotations

import functools
import statistics
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image, ImageChops

from serveready.handlers import ConfigError, HandlerOptions, InvalidInput, ModelOptions, option, parse_rows
from serveready.handlers.image_classifier import ImageClassifierHandler

FRAME = 32
GRID = 8
#: The digits data set's largest ink count per 4x4 block.
INK_MAX = 16.0
#: Pixels brighter than this fraction of the ink peak count as ink when cropping.
INK_THRESHOLD = 0.1
#: An image whose ink is fainter than this (after normalising) is treated as blank.
MIN_CONTRAST = 0.1


@dataclass(frozen=True, kw_only=True)
class DigitsOptions(HandlerOptions):
    """An image classifier's options without resize, crop and normalisation: the 8x8 grid is made here."""

    classes_file: str | None = option(None, doc="class names: JSON {index: name} or [names], or text with one name per line")
    top_k: int = option(3, minimum=1, doc="classes answered by default; a request may ask for 1..classes")
    max_pixels: int = option(25_000_000, minimum=1, doc="larger images get 400, checked before decoding")


class DigitsHandler(ImageClassifierHandler):
    """A PNG/JPEG of a handwritten digit (or its 8x8 ink counts) in, the top-k digits out."""

    options_type = DigitsOptions

    @classmethod
    def check(cls, options: Any, model: ModelOptions) -> None:
        if list(model.sample_shape[1:]) != [1, GRID, GRID]:
            raise ConfigError(f"the digits handler makes 1x8x8 inputs, but model.sample_shape is {list(model.sample_shape)}")

    def image_input(self, image: Image.Image) -> torch.Tensor:
        return to_digit_grid(image)

    def array_input(self, value: Any) -> torch.Tensor:
        return ink_grid(value)

    def instance_of(self, inputs: torch.Tensor) -> Any:
        """A model input (1x8x8, 0..1) as the ink counts ``{"inputs": ...}`` takes (ts-gpu-check sends these)."""
        return (inputs.reshape(GRID, GRID) * INK_MAX).tolist()

    @property
    def inputs_example(self) -> str:
        return f"[[{GRID} numbers] x {GRID}]"

    @property
    def explained_shape(self) -> tuple[int, ...]:
        return (GRID, GRID)


def ink_grid(inputs: Any) -> torch.Tensor:
    """8 rows of 8 ink counts (or the 64 in one list) -> the model's 8x8 input, 0..1."""
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


def grey_on_paper(image: Image.Image) -> Image.Image:
    """A grey ("L") image; transparent areas become white paper, as on a scanned page."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        paper = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(paper, image.convert("RGBA"))
    return image.convert("L")


def _pixels(image: Image.Image) -> list[float]:
    # Pillow 12.1 renamed getdata (deprecated since) to get_flattened_data; hosts may have either.
    flat = getattr(image, "get_flattened_data", None)
    return list(flat() if flat else image.getdata())


def _border(image: Image.Image) -> bytes:
    """The edge pixels of a grey ("L") image, as bytes (one per pixel): no per-pixel Python objects."""
    width, height = image.size
    strips = [(0, 0, width, 1), (0, height - 1, width, height), (0, 0, 1, height), (width - 1, 0, width, height)]
    return b"".join(image.crop(box).tobytes() for box in strips)


@functools.lru_cache(maxsize=4096)
def _stretch(paper: float, peak: int) -> tuple[int, ...]:
    # One lookup table per (paper level, ink peak): built once, not per request.
    return tuple(min(255, max(0, round((v - paper) * 255 / peak))) for v in range(256))


_INK_MASK = tuple(255 if v > INK_THRESHOLD * 255 else 0 for v in range(256))


def ink_map(grey: Image.Image) -> Image.Image:
    """Ink intensity 0..255 whatever the polarity: the paper is what the border mostly shows.

    Dark ink on light paper is inverted; the paper level is subtracted and the
    ink stretched to its peak, so a grey photo and a crisp scan look alike.
    """
    ink = ImageChops.invert(grey) if statistics.median(_border(grey)) > 127.5 else grey  # C, no lookup table
    paper = statistics.median(_border(ink))
    peak = ink.getextrema()[1] - paper
    if peak < MIN_CONTRAST * 255:
        raise InvalidInput("image shows no digit: no ink stands out from the paper")
    return ink.point(_stretch(paper, peak))


def to_digit_grid(image: Image.Image) -> torch.Tensor:
    """The (8, 8) ink fractions in [0, 1], made the way the training data was made."""
    ink = ink_map(grey_on_paper(image))
    box = ink.point(_INK_MASK).getbbox()
    crop = ink.crop(box).convert("F")
    width, height = crop.size
    scale = min(FRAME / height, FRAME / width)
    size = (max(1, min(FRAME, round(width * scale))), max(1, min(FRAME, round(height * scale))))
    frame = Image.new("F", (FRAME, FRAME), 0.0)
    frame.paste(crop.resize(size, Image.Resampling.BOX), ((FRAME - size[0]) // 2, (FRAME - size[1]) // 2))
    # A 4x4 box average of the 32x32 frame: the ink fraction of each block, as the data set counted it.
    grid = frame.resize((GRID, GRID), Image.Resampling.BOX)
    return (torch.tensor(_pixels(grid), dtype=torch.float32).reshape(GRID, GRID) / 255.0).clamp(0.0, 1.0)
