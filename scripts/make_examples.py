"""Write the README's example inputs: `examples/digit.png` and `examples/mask.png`.

`digit.png` is the first test-split seven of `models.data.digits` (16×16 grayscale, the shape of
every digits-* model); `mask.png` is its inpainting mask, white = keep (the top half), black =
generate (the bottom half). Run once; the output is committed.

    .venv/bin/python scripts/make_examples.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.data import load_dataset

OUT = Path(__file__).resolve().parent.parent / "examples"
DIGIT = 7


def main() -> None:
    OUT.mkdir(exist_ok=True)
    digits = load_dataset("digits", "test")
    index = int(torch.nonzero(digits.labels["class"] == DIGIT)[0])
    pixels = ((digits.images[index, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    Image.fromarray(pixels.numpy(), mode="L").save(OUT / "digit.png", optimize=True)
    height, width = pixels.shape
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[: height // 2] = 255
    Image.fromarray(mask, mode="L").save(OUT / "mask.png", optimize=True)
    print(f"wrote {OUT / 'digit.png'} (a test-split {DIGIT}) and {OUT / 'mask.png'}")


if __name__ == "__main__":
    main()
