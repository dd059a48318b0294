"""A grid of output images, as `ddserve generate --out grid.png` writes it."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

from PIL import Image


def image_grid(
    pngs: Sequence[bytes],
    *,
    columns: int | None = None,
    scale: int = 1,
    padding: int = 2,
    background: int = 0,
) -> Image.Image:
    """Tile images (PNG bytes, all of one size) row by row into one picture: `columns` per row
    (default ⌈√n⌉), each enlarged `scale`× with nearest-neighbour (the models' images are tiny), with
    `padding` pixels of `background` grey between and around them. Grayscale stays grayscale unless
    some image is in colour."""
    if not pngs:
        raise ValueError("no images to tile")
    if scale < 1 or padding < 0:
        raise ValueError("scale must be ≥ 1 and padding ≥ 0")
    pictures = [Image.open(io.BytesIO(data)) for data in pngs]
    mode = "L" if all(p.mode in ("L", "1", "P") and _is_gray(p) for p in pictures) else "RGB"
    pictures = [p.convert(mode) for p in pictures]
    width, height = pictures[0].size
    if any(p.size != (width, height) for p in pictures):
        raise ValueError("images of different sizes cannot be tiled")
    cols = columns if columns is not None else math.ceil(math.sqrt(len(pictures)))
    cols = max(1, min(cols, len(pictures)))
    rows = math.ceil(len(pictures) / cols)
    cell_w, cell_h = width * scale, height * scale
    fill = background if mode == "L" else (background,) * 3
    grid = Image.new(
        mode, (cols * cell_w + (cols + 1) * padding, rows * cell_h + (rows + 1) * padding), fill
    )
    for index, picture in enumerate(pictures):
        row, col = divmod(index, cols)
        if scale > 1:
            picture = picture.resize((cell_w, cell_h), Image.Resampling.NEAREST)
        grid.paste(
            picture, (padding + col * (cell_w + padding), padding + row * (cell_h + padding))
        )
    return grid


def _is_gray(picture: Image.Image) -> bool:
    if picture.mode != "P":
        return True
    rgb = picture.convert("RGB")
    r, g, b = rgb.split()
    return r.tobytes() == g.tobytes() == b.tobytes()
