"""Uploaded images: base64 PNG → checked, canonical PNG for the workers.

Checks, cheapest first, so a hostile upload costs little: the base64 text length (413), the decoded
size (413), the PNG signature and IHDR header (400), the pixel count read from the header *before*
decoding (413, a decompression bomb never gets inflated), a full decode (400 on a corrupt file), and
the model's size (422). The image is then re-encoded in the model's mode ("L" for 1 channel, "RGB"
for 3), so workers receive exactly one format.
"""

from __future__ import annotations

import base64
import binascii
import io
import struct
import warnings
from dataclasses import dataclass

from PIL import Image

from service.errors import ApiError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_DATA_URL_PREFIX = "data:image/png;base64,"


@dataclass(frozen=True)
class UploadLimits:
    max_image_bytes: int
    max_image_pixels: int


def decode_base64(text: str, param: str, limits: UploadLimits) -> bytes:
    """Strict base64 (an optional `data:image/png;base64,` prefix is allowed) → bytes."""
    if text.startswith(_DATA_URL_PREFIX):
        text = text[len(_DATA_URL_PREFIX) :]
    text = "".join(text.split())  # line-wrapped base64 is common
    if len(text) * 3 // 4 > limits.max_image_bytes + 3:
        raise ApiError(
            413,
            "image_too_large",
            f"{param} is over the {limits.max_image_bytes}-byte limit",
            param,
        )
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "invalid_base64", f"{param} is not valid base64", param) from None
    if len(data) > limits.max_image_bytes:
        raise ApiError(
            413,
            "image_too_large",
            f"{param} is over the {limits.max_image_bytes}-byte limit",
            param,
        )
    return data


def png_size(data: bytes, param: str) -> tuple[int, int]:
    """(width, height) from the PNG's IHDR chunk, without decoding the image."""
    if not data.startswith(PNG_SIGNATURE) or len(data) < 33 or data[12:16] != b"IHDR":
        raise ApiError(400, "invalid_image", f"{param} is not a PNG image", param)
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def load_png(
    text: str,
    param: str,
    limits: UploadLimits,
    size: tuple[int, int] | None,
    mode: str,
) -> Image.Image:
    """Decode and check one uploaded image; the result is in `mode` and, if given, of `size`
    (width, height)."""
    data = decode_base64(text, param, limits)
    width, height = png_size(data, param)
    if width * height > limits.max_image_pixels:
        raise ApiError(
            413,
            "image_too_large",
            f"{param} has {width}×{height} pixels; the limit is {limits.max_image_pixels}",
            param,
        )
    if width == 0 or height == 0:
        raise ApiError(400, "invalid_image", f"{param} has no pixels", param)
    if size is not None and (width, height) != size:
        raise ApiError(
            422,
            "wrong_image_size",
            f"{param} is {width}×{height}; this model takes {size[0]}×{size[1]} images",
            param,
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=["PNG"])
            image.load()
    except Exception:  # Pillow raises many types for corrupt files
        raise ApiError(
            400, "invalid_image", f"{param} is not a readable PNG image", param
        ) from None
    if image.mode in {"RGBA", "LA", "PA"} or (image.mode == "P" and "transparency" in image.info):
        # Composite on white: transparent pixels must not turn black on conversion.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert(mode)


def encode_png(image: Image.Image) -> str:
    """Base64 of the image as PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def canonical_image(
    text: str, param: str, limits: UploadLimits, size: tuple[int, int], channels: int
) -> str:
    """An uploaded image re-encoded as the model reads it (base64 PNG, mode L or RGB)."""
    return encode_png(load_png(text, param, limits, size, "L" if channels == 1 else "RGB"))


def canonical_mask(text: str, param: str, limits: UploadLimits, size: tuple[int, int]) -> str:
    """An inpainting mask as mode-L PNG with 255 (keep) where the upload is ≥ 128, else 0 (generate)."""
    mask = load_png(text, param, limits, size, "L").point(lambda v: 255 if v >= 128 else 0)
    return encode_png(mask)
