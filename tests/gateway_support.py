"""Shared pieces of the gateway tests: a config-only zoo (no weights: the gateway never loads
models), PNG builders, and an app on an in-process fakeredis server."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import fakeredis
from fastapi import FastAPI
from PIL import Image

from ddserve.settings import Settings
from models.data.text import CONTEXT_LEN, VOCABULARY
from service.app import create_app

CLASSES = ["zero", "one", "two"]


def write_config_zoo(root: Path) -> Path:
    """Six models' config.json, covering every task and kind of conditioning."""
    entries: list[dict[str, Any]] = [
        {
            "name": "tiny-ddpm",
            "kind": "diffusion",
            "tasks": ["generate", "inpaint"],
            "dataset": "digits",
            "image": {"channels": 1, "height": 8, "width": 8},
            "conditioning": {"type": "class", "classes": CLASSES},
            "schedule": {"kind": "linear", "num_timesteps": 100},
            "samplers": ["ddpm", "ddim"],
            "defaults": {"num_inference_steps": 10, "guidance_scale": 3.0, "jump_length": 5},
            "classifier": "tiny-clf",
        },
        {
            "name": "tiny-clf",
            "kind": "noisy-classifier",
            "dataset": "digits",
            "image": {"channels": 1, "height": 8, "width": 8},
        },
        {
            "name": "tiny-text",
            "kind": "diffusion",
            "tasks": ["generate"],
            "dataset": "shapes",
            "image": {"channels": 3, "height": 8, "width": 8},
            "conditioning": {
                "type": "text",
                "vocabulary": VOCABULARY,
                "context_len": CONTEXT_LEN,
            },
            "schedule": {"kind": "cosine", "num_timesteps": 50},
            "samplers": ["ddim"],
            "defaults": {"num_inference_steps": 20, "guidance_scale": 2.5},
        },
        {
            "name": "tiny-ae",
            "kind": "kl-autoencoder",
            "tasks": ["encode", "decode", "reconstruct"],
            "dataset": "digits",
            "image": {"channels": 1, "height": 8, "width": 8},
            "latent_shape": [2, 4, 4],
        },
        {
            "name": "tiny-vae",
            "kind": "vae",
            "tasks": ["generate", "encode", "decode", "reconstruct"],
            "dataset": "digits",
            "image": {"channels": 1, "height": 8, "width": 8},
            "latent_shape": [4],
        },
        {
            "name": "tiny-vq",
            "kind": "vqvae",
            "tasks": ["encode", "decode", "reconstruct"],
            "dataset": "shapes",
            "image": {"channels": 3, "height": 8, "width": 8},
            "latent_shape": [2, 2, 2],
            "code_shape": [2, 2],
            "codebook_size": 4,
        },
    ]
    for entry in entries:
        folder = root / entry["name"]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(entry))
    return root


def png_b64(width: int = 8, height: int = 8, mode: str = "L", value: int | tuple = 128) -> str:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), value).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and a valid IHDR claiming width×height, then no image data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr
    chunk += struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return b"\x89PNG\r\n\x1a\n" + chunk


def make_app(
    zoo: Path, tmp: Path, server: fakeredis.FakeServer | None = None, **overrides: Any
) -> tuple[FastAPI, fakeredis.FakeServer]:
    """A gateway on a fresh fakeredis server, or on `server` (as another gateway process on the
    same Redis); the server is returned so a test can take Redis down."""
    server = server if server is not None else fakeredis.FakeServer()
    fields: dict[str, Any] = {
        "zoo_dir": zoo,
        "storage_dir": tmp / "images",
        "auth_enabled": False,
        "signing_secret": "test-secret",
        "key_prefix": "gwtest",
    }
    fields.update(overrides)
    settings = Settings(**fields)
    return create_app(settings, fakeredis.FakeRedis(server=server)), server


def assert_error(response: Any, status: int, code: str, param: str | None = None) -> dict:
    """The contract's error body with this status, code and (if given) param."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"type", "code", "message", "param"}
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]
