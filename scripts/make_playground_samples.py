"""Write the playground's test images: `service/static/samples/*.png` and their `index.json`.

The gateway has no torch and no datasets, so the inpainting and autoencoder panels pick from these
small PNGs: the first test-split image of each digit class (16×16 grayscale, `models.data.digits`)
and the first test-split shapes (32×32 RGB, `models.data.shapes`). Run once; the output is committed.

    .venv/bin/python scripts/make_playground_samples.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.data import load_dataset

OUT = Path(__file__).resolve().parent.parent / "service" / "static" / "samples"
SHAPES_COUNT = 8


def to_pil(image: torch.Tensor) -> Image.Image:
    """[C, H, W] in [−1, 1] → an 8-bit PIL image (L for one channel, RGB for three)."""
    pixels = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    if pixels.shape[0] == 1:
        return Image.fromarray(pixels[0], mode="L")
    return Image.fromarray(np.transpose(pixels, (1, 2, 0)), mode="RGB")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob("*.png"):
        old.unlink()
    entries = []
    digits = load_dataset("digits", "test")
    labels = digits.labels["class"]
    for digit in range(10):
        index = int((labels == digit).nonzero()[0, 0])
        name = f"digits-{digit}.png"
        to_pil(digits.images[index]).save(OUT / name, optimize=True)
        entries.append({"file": name, "dataset": "digits", "label": str(digit)})
    shapes = load_dataset("shapes", "test")
    for index in range(SHAPES_COUNT):
        name = f"shapes-{index}.png"
        to_pil(shapes.images[index]).save(OUT / name, optimize=True)
        label = shapes.captions[index] if shapes.captions else f"shape {index}"
        entries.append({"file": name, "dataset": "shapes", "label": str(label)})
    for entry in entries:
        with Image.open(OUT / entry["file"]) as picture:
            entry.update(width=picture.width, height=picture.height, channels=len(picture.mode))
    (OUT / "index.json").write_text(json.dumps({"samples": entries}, indent=1) + "\n")
    print(f"wrote {len(entries)} images to {OUT}")


if __name__ == "__main__":
    main()
