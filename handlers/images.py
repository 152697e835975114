"""Turn an uploaded image into a model's input, by torchvision's conventions.

Pillow and torch only (both on every TorchServe host); no numpy, which torch
does not require, and no torchvision, which few TorchServe hosts have.

``standard_input`` does what a torchvision pipeline of ``Resize``, ``CenterCrop``,
``ToTensor`` and ``Normalize`` does to a PIL image (bilinear resampling, the same
rounding of the crop box, zero padding when the crop is larger than the image), so a
classifier trained with those transforms sees the same numbers here.
"""

from __future__ import annotations

import io
import struct
import warnings

import torch
from PIL import Image, UnidentifiedImageError

from .errors import InvalidInput
from .payload import decode_base64  # noqa: F401  (where 0.3.0 had it)

FORMATS = ("PNG", "JPEG")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode PNG or JPEG bytes, refusing what is not a whole, bounded image before it costs memory.

    Raises:
        InvalidInput: not an image, another format, zero-size, over ``max_pixels``, or truncated.
    """
    if not data:
        raise InvalidInput("request body is empty: send a PNG or JPEG image")
    with warnings.catch_warnings():
        # Pillow warns about odd chunks and EXIF in a client's file: the client's problem, not the log's.
        warnings.simplefilter("ignore")
        return _decode(data, max_pixels)


def _decode(data: bytes, max_pixels: int) -> Image.Image:
    try:
        # Only PNG and JPEG parsers ever see a client's bytes (not TIFF, PSD, ... Pillow's other plugins).
        image = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
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
    return image


def resized_size(width: int, height: int, resize: tuple[int, ...]) -> tuple[int, int]:
    """(width, height) after torchvision's ``Resize``: [size] scales the shorter side, keeping aspect."""
    if len(resize) == 2:
        return resize[1], resize[0]
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = resize[0], int(resize[0] * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def center_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """torchvision's ``CenterCrop``: zero padding where the image is smaller, then the centred box."""
    w, h = image.size
    if width > w or height > h:
        canvas = Image.new(image.mode, (max(w, width), max(h, height)), 0)
        canvas.paste(image, ((width - w) // 2 if width > w else 0, (height - h) // 2 if height > h else 0))
        image, (w, h) = canvas, canvas.size
    top, left = int(round((h - height) / 2.0)), int(round((w - width) / 2.0))
    return image.crop((left, top, left + width, top + height))


def standard_input(
    image: Image.Image,
    channels: int,
    size: tuple[int, int],
    resize: tuple[int, ...] | None = None,
    crop: tuple[int, ...] | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    max_pixels: int | None = None,
) -> torch.Tensor:
    """The (channels, height, width) float input of an ordinary image classifier.

    Args:
        image: the decoded image, any mode.
        channels: 3 (RGB) or 1 (grey).
        size: the model's (height, width); with neither ``resize`` nor ``crop`` the image is resized to it.
        resize: [size] (shorter side, aspect kept) or [height, width].
        crop: [size] or [height, width], taken from the centre after resizing.
        mean, std: per channel (or one for all), applied to values scaled to 0..1.
        max_pixels: refuse an image whose resized size would be larger (a 100000x1 PNG of a few
            hundred bytes would otherwise become 25600000x256 pixels and exhaust the worker's memory).

    Raises:
        InvalidInput: the resized image would exceed ``max_pixels``.
    """
    if resize is None and crop is None:
        resize = size
    target = image.size if resize is None else resized_size(*image.size, resize)
    if resize is not None and max_pixels is not None and target[0] * target[1] > max_pixels:
        raise InvalidInput(f"image is {image.size[0]}x{image.size[1]}: resizing its shorter side to {resize[0]} would make it "
                           f"{target[0]}x{target[1]} = {target[0] * target[1]} pixels, more than the limit of {max_pixels}; "
                           "send a less elongated image")
    image = image.convert("RGB" if channels == 3 else "L")
    if target != image.size:
        image = image.resize(target, Image.Resampling.BILINEAR)
    if crop is not None:
        image = center_crop(image, crop[0], crop[-1])
    width, height = image.size
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    tensor = pixels.reshape(height, width, channels).permute(2, 0, 1).float().div(255.0)
    if mean is not None:
        tensor = tensor - torch.tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
    if std is not None:
        tensor = tensor / torch.tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
    return tensor
