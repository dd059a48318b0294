"""Uploaded images: base64 PNG → checked, canonical PNG for the workers.

Checks, cheapest first, so a hostile upload costs little: the base64 text length (413), the decoded
size (413), the PNG signature and IHDR header (400), the pixel count read from the header *before*
decoding (413, a decompression bomb never gets inflated), a full decode (400 on a corrupt file), and
the model's size (422). The image is then re-encoded in the model's mode ("L" for 1 channel, "RGB"
for 3), so workers receive exactly one format: every PNG colour type and bit depth converts
(16-bit scaled, any transparency composited on white), and a pixel format Pillow cannot convert is
a 422 `unsupported_image`.
"""

from __future__ import annotations

import base64
import binascii
import io
import struct
import warnings
from dataclasses import dataclass

import numpy as np
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
    try:
        image = _eight_bit(image, data)
        if image.mode in {"LA", "RGBA"}:
            # Composite on white: transparent pixels must not turn black on conversion.
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba)
        return image.convert(mode)
    except (ValueError, TypeError, OSError):  # a mode Pillow cannot convert: the client's file
        raise ApiError(
            422,
            "unsupported_image",
            f"{param} has a pixel format that cannot be converted (PIL mode {image.mode}); "
            "send an 8-bit grayscale, RGB or RGBA PNG",
            param,
        ) from None


def _trns(data: bytes) -> bytes | None:
    """The PNG's tRNS chunk (its colour key or palette alphas), if any: it comes before IDAT."""
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if kind in {b"IDAT", b"IEND"}:
            return None
        if kind == b"tRNS":
            return data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    return None


def _eight_bit(image: Image.Image, data: bytes) -> Image.Image:
    """The decoded PNG as 8-bit L, LA, RGB, RGBA or P, a tRNS colour key turned into an alpha band.

    Why not Pillow's `convert` alone: it keeps 16-bit grey as I;16, which converts to L by clipping
    at 255 (an all-white image); it keeps a grey or RGB colour key in the file's units, which do not
    match its decoded pixels below 8 bits or at 16; and it cannot convert mode 1 with a key to RGB
    at all (a 500 before this). So grey is rebuilt from the file's sample values, and the key is
    read from the file's own tRNS chunk.
    """
    depth, colour_type = data[24], data[25]
    trns = _trns(data)
    if colour_type == 0 and image.mode in {"1", "L", "I", "I;16", "I;16B", "I;16L"}:
        top = (1 << depth) - 1 if depth in {1, 2, 4, 8, 16} else 255
        samples = np.asarray(image).astype(np.uint32)
        if image.mode == "L" and top < 255:  # Pillow scaled 2- and 4-bit grey to 0..255
            samples //= 255 // top
        elif image.mode == "1":
            samples = (samples > 0).astype(np.uint32) * top
        grey = ((samples * 255 + top // 2) // top).astype(np.uint8)
        if trns is None or len(trns) < 2:
            return Image.fromarray(grey)
        key = struct.unpack(">H", trns[:2])[0]
        alpha = np.where(samples == key, 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([grey, alpha], axis=-1))
    if colour_type == 2 and image.mode == "RGB" and trns is not None and len(trns) >= 6:
        key = np.array(struct.unpack(">HHH", trns[:6]), dtype=np.uint32)
        if depth == 16:  # Pillow keeps the high byte of 16-bit RGB: match the key's high byte
            key >>= 8
        rgb = np.asarray(image).astype(np.uint32)
        alpha = np.where((rgb == key).all(axis=-1), 0, 255).astype(np.uint8)
        return Image.fromarray(np.concatenate([rgb.astype(np.uint8), alpha[..., None]], axis=-1))
    if image.mode in {"RGBA", "LA", "PA"} or (image.mode == "P" and "transparency" in image.info):
        return image.convert("RGBA")
    return image


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
