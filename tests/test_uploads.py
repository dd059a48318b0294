"""Uploaded images (`service.uploads`): every PNG colour type × bit depth × transparency converts to
the model's mode, or is refused with a 4xx — never a 500 (issue #18). A property test over PNGs
written here byte by byte (so each IHDR/PLTE/tRNS combination is exactly the one drawn), plus files
Pillow writes in its own modes, and one case through HTTP."""

from __future__ import annotations

import base64
import io
import random
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from service.errors import ApiError
from service.uploads import UploadLimits, canonical_image, canonical_mask
from tests.gateway_support import make_app, write_config_zoo

LIMITS = UploadLimits(max_image_bytes=1 << 20, max_image_pixels=1 << 16)
CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # PNG colour type → samples per pixel
DEPTHS = {0: [1, 2, 4, 8, 16], 2: [8, 16], 3: [1, 2, 4, 8], 4: [8, 16], 6: [8, 16]}


def _chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


@dataclass
class Png:
    """A PNG written byte by byte, with the sample values and colour key it holds."""

    data: bytes
    colour_type: int
    depth: int
    samples: np.ndarray  # (height, width, channels) in the file's units
    key: tuple[int, ...] | None  # the tRNS colour key (grey or RGB types)

    @property
    def b64(self) -> str:
        return base64.b64encode(self.data).decode()


def write_png(
    width: int, height: int, colour_type: int, depth: int, trns: bool, seed: int, key_hit: bool
) -> Png:
    rng = random.Random(seed)
    top = (1 << depth) - 1
    channels = CHANNELS[colour_type]
    samples = np.array(
        [
            [[rng.randint(0, top) for _ in range(channels)] for _ in range(width)]
            for _ in range(height)
        ]
    )
    key = None
    if trns and colour_type in (0, 2):
        # the key is a pixel of the image (so some pixels are transparent) or a random value
        key = (
            tuple(int(v) for v in samples[0, 0])
            if key_hit
            else tuple(rng.randint(0, top) for _ in range(channels))
        )
    raw = b""
    for row in samples:
        values = [int(v) for v in row.reshape(-1)]
        if depth == 16:
            packed = b"".join(struct.pack(">H", v) for v in values)
        elif depth == 8:
            packed = bytes(values)
        else:
            bits = "".join(format(v, f"0{depth}b") for v in values)
            bits += "0" * (-len(bits) % 8)
            packed = bytes(int(bits[i : i + 8], 2) for i in range(0, len(bits), 8))
        raw += b"\0" + packed  # filter type 0 per row
    data = b"\x89PNG\r\n\x1a\n"
    data += _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0))
    if colour_type == 3:
        data += _chunk(b"PLTE", bytes(rng.randint(0, 255) for _ in range(3 * (top + 1))))
        if trns:
            data += _chunk(b"tRNS", bytes(rng.randint(0, 255) for _ in range(top + 1)))
    elif key is not None:
        data += _chunk(b"tRNS", struct.pack(f">{len(key)}H", *key))
    data += _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")
    return Png(data, colour_type, depth, samples, key)


@st.composite
def pngs(draw: st.DrawFn) -> Png:
    colour_type = draw(st.sampled_from(sorted(DEPTHS)))
    return write_png(
        width=draw(st.integers(1, 9)),
        height=draw(st.integers(1, 9)),
        colour_type=colour_type,
        depth=draw(st.sampled_from(DEPTHS[colour_type])),
        trns=draw(st.booleans()) if colour_type in (0, 2, 3) else False,
        seed=draw(st.integers(0, 2**16)),
        key_hit=draw(st.booleans()),
    )


def _decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


@settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(png=pngs(), channels=st.sampled_from([1, 3]))
def test_every_png_colour_type_depth_and_transparency_converts(png: Png, channels: int) -> None:
    height, width = png.samples.shape[:2]
    out = _decode(canonical_image(png.b64, "images[0]", LIMITS, (width, height), channels))
    assert out.mode == ("L" if channels == 1 else "RGB")
    assert out.size == (width, height)
    pixels = np.asarray(out).astype(int)
    top = (1 << png.depth) - 1
    if png.key is not None:  # colour-keyed pixels are composited on white
        transparent = (png.samples == np.array(png.key)).all(axis=-1)
        if png.colour_type == 2 and png.depth == 16:  # Pillow keeps 8 of 16 bits of RGB
            transparent = (png.samples >> 8 == np.array(png.key) >> 8).all(axis=-1)
        assert (pixels[transparent] == 255).all()
    else:
        transparent = np.zeros((height, width), dtype=bool)
    if png.colour_type == 0:  # grey: the file's samples scaled to 8 bits, exactly
        grey = (png.samples[..., 0] * 255 + top // 2) // top
        expected = np.where(transparent, 255, grey)
        got = pixels if channels == 1 else pixels[..., 0]
        assert (got == expected).all()
        if channels == 3:
            assert (pixels == pixels[..., :1]).all()
    if png.colour_type == 2 and channels == 3:  # RGB: the samples' high byte
        rgb = png.samples >> (8 if png.depth == 16 else 0)
        assert (pixels[~transparent] == rgb[~transparent]).all()


@settings(max_examples=100, deadline=None, derandomize=True)
@given(png=pngs())
def test_every_png_makes_a_binary_mask(png: Png) -> None:
    height, width = png.samples.shape[:2]
    mask = _decode(canonical_mask(png.b64, "mask", LIMITS, (width, height)))
    assert mask.mode == "L" and mask.size == (width, height)
    assert set(np.unique(np.asarray(mask))) <= {0, 255}


def _pillow_file(mode: str, fmt: str, **save: object) -> str:
    buffer = io.BytesIO()
    image = Image.new(mode, (6, 5))
    image.save(buffer, format=fmt, **save)
    return base64.b64encode(buffer.getvalue()).decode()


PILLOW_FILES = {
    "1": _pillow_file("1", "PNG"),
    "1+trns": _pillow_file("1", "PNG", transparency=0),
    "L+trns": _pillow_file("L", "PNG", transparency=0),
    "LA": _pillow_file("LA", "PNG"),
    "I;16": _pillow_file("I;16", "PNG"),
    "I;16+trns": _pillow_file("I;16", "PNG", transparency=0),
    "P": _pillow_file("P", "PNG"),
    "P+trns": _pillow_file("P", "PNG", transparency=0),
    "P-4bit": _pillow_file("P", "PNG", bits=4),
    "RGB+trns": _pillow_file("RGB", "PNG", transparency=(0, 0, 0)),
    "RGBA": _pillow_file("RGBA", "PNG"),
    "RGBA-interlaced": _pillow_file("RGBA", "PNG", interlace=1),
}
NOT_PNG = {
    "CMYK (JPEG)": _pillow_file("CMYK", "JPEG"),
    "L (JPEG)": _pillow_file("L", "JPEG"),
    "F (TIFF)": _pillow_file("F", "TIFF"),
    "RGB (WebP)": _pillow_file("RGB", "WEBP"),
    "RGB (GIF)": _pillow_file("RGB", "GIF"),
}


@pytest.mark.parametrize("name", sorted(PILLOW_FILES))
@pytest.mark.parametrize("channels", [1, 3])
def test_pillow_modes_convert(name: str, channels: int) -> None:
    out = _decode(canonical_image(PILLOW_FILES[name], "image", LIMITS, (6, 5), channels))
    assert out.mode == ("L" if channels == 1 else "RGB") and out.size == (6, 5)
    if "trns" in name:  # the pixels are the key colour: all composited on white
        assert (np.asarray(out) == 255).all()
    mask = _decode(canonical_mask(PILLOW_FILES[name], "mask", LIMITS, (6, 5)))
    assert mask.mode == "L"


@pytest.mark.parametrize("name", sorted(NOT_PNG))
def test_other_formats_are_a_400(name: str) -> None:
    with pytest.raises(ApiError) as caught:
        canonical_image(NOT_PNG[name], "image", LIMITS, (6, 5), 3)
    assert (caught.value.status, caught.value.code) == (400, "invalid_image")


def test_a_one_bit_grey_png_with_a_colour_key_reaches_an_rgb_model(tmp_path: Path) -> None:
    app, _ = make_app(write_config_zoo(tmp_path / "zoo"), tmp_path)
    png = write_png(8, 8, colour_type=0, depth=1, trns=True, seed=3, key_hit=True)
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.post("/encode", json={"model": "tiny-vq", "images": [png.b64]})
        assert r.status_code == 202, r.text
        sixteen = write_png(8, 8, colour_type=0, depth=16, trns=True, seed=4, key_hit=True)
        r = client.post("/encode", json={"model": "tiny-vq", "images": [sixteen.b64]})
        assert r.status_code == 202, r.text
