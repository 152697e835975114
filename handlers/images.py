"""Turn an uploaded image into the digits model's 8x8 input.

Pillow and torch only (both on every TorchServe host); no numpy, which torch
does not require.

scikit-learn's digits were made from 32x32 binary bitmaps, normalised so the
digit's height fills the frame, by counting the ink pixels in each 4x4 block
(0..16). An uploaded image goes the same way: find the paper and the ink
(dark ink on light paper, or light on dark), crop to the ink, scale its height
to 32 pixels, centre it in a 32x32 frame, and take the ink fraction of each
4x4 block.
"""

from __future__ import annotations

import base64
import binascii
import io
import statistics
import struct

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from handlers.errors import InvalidInput

FRAME = 32
GRID = 8
FORMATS = ("PNG", "JPEG")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Pixels brighter than this fraction of the ink peak count as ink when cropping.
INK_THRESHOLD = 0.1
#: An image whose ink is fainter than this (after normalising) is treated as blank.
MIN_CONTRAST = 0.1


def decode_base64(text: object) -> bytes:
    """The bytes of a base64 string (``data:`` URL prefixes allowed)."""
    if not isinstance(text, str) or not text:
        raise InvalidInput("'image' must be a non-empty base64 string of a PNG or JPEG file")
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise InvalidInput(f"'image' is not valid base64: {err}") from None


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode PNG or JPEG bytes into a grey ("L") image; transparent areas become white paper.

    Raises:
        InvalidInput: not an image, another format, zero-size, over ``max_pixels``, or truncated.
    """
    if not data:
        raise InvalidInput("request body is empty: send a PNG or JPEG image")
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except UnidentifiedImageError:
        if data.startswith(PNG_SIGNATURE) and len(data) >= 24:  # Pillow refuses a 0-pixel PNG as unidentified
            width, height = struct.unpack(">II", data[16:24])
            if width == 0 or height == 0:
                raise InvalidInput(f"image is {width}x{height}: it has no pixels") from None
        raise InvalidInput("request body is not a PNG or JPEG image (nor JSON with 'image' or 'inputs')") from None
    except Image.DecompressionBombError as err:  # Pillow's own ceiling, far above ours
        raise InvalidInput(f"image has more pixels than the limit of {max_pixels}: {err}") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise InvalidInput(f"image header cannot be read: {err}") from None
    if image.format not in FORMATS:
        raise InvalidInput(f"image format {image.format} is not supported: send PNG or JPEG")
    width, height = image.size
    if width == 0 or height == 0:
        raise InvalidInput(f"image is {width}x{height}: it has no pixels")
    if width * height > max_pixels:
        raise InvalidInput(f"image is {width}x{height} = {width * height} pixels, more than the limit of {max_pixels}")
    try:
        image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise InvalidInput(f"image cannot be decoded (truncated or corrupt {image.format}): {err}") from None
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        paper = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(paper, image.convert("RGBA"))
    return image.convert("L")


def _pixels(image: Image.Image) -> list[float]:
    # Pillow 12.1 renamed getdata (deprecated since) to get_flattened_data; hosts may have either.
    flat = getattr(image, "get_flattened_data", None)
    return list(flat() if flat else image.getdata())


def _border(image: Image.Image) -> list[int]:
    width, height = image.size
    strips = [(0, 0, width, 1), (0, height - 1, width, height), (0, 0, 1, height), (width - 1, 0, width, height)]
    return [v for box in strips for v in _pixels(image.crop(box))]


def ink_map(grey: Image.Image) -> Image.Image:
    """Ink intensity 0..255 whatever the polarity: the paper is what the border mostly shows.

    Dark ink on light paper is inverted; the paper level is subtracted and the
    ink stretched to its peak, so a grey photo and a crisp scan look alike.
    """
    ink = ImageOps.invert(grey) if statistics.median(_border(grey)) > 127.5 else grey
    paper = statistics.median(_border(ink))
    peak = ink.getextrema()[1] - paper
    if peak < MIN_CONTRAST * 255:
        raise InvalidInput("image shows no digit: no ink stands out from the paper")
    return ink.point([min(255, max(0, round((v - paper) * 255 / peak))) for v in range(256)])


def to_digit_grid(grey: Image.Image) -> torch.Tensor:
    """The (8, 8) ink fractions in [0, 1], made the way the training data was made."""
    ink = ink_map(grey)
    box = ink.point([255 if v > INK_THRESHOLD * 255 else 0 for v in range(256)]).getbbox()
    crop = ink.crop(box).convert("F")
    width, height = crop.size
    scale = min(FRAME / height, FRAME / width)
    size = (max(1, min(FRAME, round(width * scale))), max(1, min(FRAME, round(height * scale))))
    frame = Image.new("F", (FRAME, FRAME), 0.0)
    frame.paste(crop.resize(size, Image.Resampling.BOX), ((FRAME - size[0]) // 2, (FRAME - size[1]) // 2))
    # A 4x4 box average of the 32x32 frame: the ink fraction of each block, as the data set counted it.
    grid = frame.resize((GRID, GRID), Image.Resampling.BOX)
    return (torch.tensor(_pixels(grid), dtype=torch.float32).reshape(GRID, GRID) / 255.0).clamp(0.0, 1.0)
