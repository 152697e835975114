"""Turn an uploaded image into the digits model's 8x8 input.

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
import struct

import numpy as np
from PIL import Image, UnidentifiedImageError

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


def open_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode PNG or JPEG bytes into a grey float array in [0, 1] (transparent areas become white).

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
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def ink_map(grey: np.ndarray) -> np.ndarray:
    """Ink intensity in [0, 1] whatever the polarity: the paper is what the border mostly shows."""
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    ink = 1.0 - grey if np.median(border) > 0.5 else grey
    paper = float(np.median(np.concatenate([ink[0], ink[-1], ink[:, 0], ink[:, -1]])))
    ink = ink - paper
    peak = float(ink.max())
    if peak < MIN_CONTRAST:
        raise InvalidInput("image shows no digit: no ink stands out from the paper")
    return np.clip(ink / peak, 0.0, 1.0)


def to_digit_grid(grey: np.ndarray) -> np.ndarray:
    """The (8, 8) ink fractions in [0, 1], made the way the training data was made."""
    ink = ink_map(grey)
    rows = np.flatnonzero((ink > INK_THRESHOLD).any(axis=1))
    cols = np.flatnonzero((ink > INK_THRESHOLD).any(axis=0))
    crop = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    height, width = crop.shape
    scale = min(FRAME / height, FRAME / width)
    size = (max(1, min(FRAME, round(width * scale))), max(1, min(FRAME, round(height * scale))))
    resized = np.asarray(Image.fromarray(crop.astype(np.float32), mode="F").resize(size, Image.Resampling.BOX))
    frame = np.zeros((FRAME, FRAME), dtype=np.float32)
    top, left = (FRAME - size[1]) // 2, (FRAME - size[0]) // 2
    frame[top : top + size[1], left : left + size[0]] = resized
    block = FRAME // GRID
    return np.clip(frame.reshape(GRID, block, GRID, block).mean(axis=(1, 3)), 0.0, 1.0)
