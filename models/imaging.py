"""Tensors ↔ images: [−1, 1] floats to uint8 pixels, grids, PNG bytes. Shared by training, eval, workers."""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] in [−1, 1] → [N, H, W, C] uint8 (round to nearest grey level)."""
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).numpy()


def from_uint8(pixels: np.ndarray) -> torch.Tensor:
    """[N, H, W, C] uint8 → [N, C, H, W] float32 in [−1, 1]."""
    return torch.from_numpy(pixels.astype(np.float32)).permute(0, 3, 1, 2) / 127.5 - 1.0


def to_pil(image: torch.Tensor) -> Image.Image:
    """[C, H, W] in [−1, 1] → a PIL image (L for one channel, RGB for three)."""
    array = to_uint8(image[None])[0]
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def png_bytes(image: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    to_pil(image).save(buffer, format="PNG")
    return buffer.getvalue()


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 1) -> torch.Tensor:
    """[N, C, H, W] → one [C, H', W'] image with the samples tiled row by row (padding = −1)."""
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    grid = torch.full((c, ncol * (h + padding) + padding, nrow * (w + padding) + padding), -1.0)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top : top + h, left : left + w] = images[i].detach().float().cpu()
    return grid


def save_grid(images: torch.Tensor, path: str, nrow: int | None = None, scale: int = 1) -> None:
    grid = to_pil(make_grid(images, nrow))
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    grid.save(path)
