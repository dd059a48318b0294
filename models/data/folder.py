"""`folder`: a directory of the user's own images, centre-cropped, resized and scaled to [−1, 1].

Layout: either `root/<class>/**/<image>` (labels from the sub-folder names, sorted, as `class`) or
images directly under `root` (unlabelled). The train/test split is fixed: within each class the
files (sorted by path) are shuffled by `numpy.random.default_rng(seed)` and the first
⌈test_fraction · n⌉ go to the test split (at least one, when the class has two or more images).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.data.dataset import ImageDataset

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _images_under(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )


def _read(path: Path, image_size: int, mode: str) -> np.ndarray:
    """One image → [H, W, C] uint8: the central square crop, resized with a Lanczos filter."""
    with Image.open(path) as image:
        image = image.convert(mode)
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
        image = image.resize((image_size, image_size), Image.LANCZOS)
        array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def _test_indices(n: int, test_fraction: float, rng: np.random.Generator) -> np.ndarray:
    if n < 2:
        return np.zeros(0, dtype=np.int64)
    count = min(n - 1, max(1, math.ceil(test_fraction * n)))
    return rng.permutation(n)[:count]


def load_folder(
    root: str | Path,
    split: str = "train",
    image_size: int = 32,
    channels: int = 3,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> ImageDataset:
    """The `train`, `test` or `all` split of the images under `root` ([N, channels, size, size])."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (greyscale) or 3 (RGB), got {channels}")
    if split not in ("train", "test", "all"):
        raise ValueError(f"unknown split {split!r}; expected 'train', 'test' or 'all'")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"no images: {str(root)!r} is not a directory")
    subfolders = sorted(p for p in root.iterdir() if p.is_dir() and _images_under(p))
    loose = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if subfolders and loose:
        raise ValueError(
            f"{str(root)!r} mixes images in class sub-folders with {len(loose)} image(s) at its "
            "top level; move the loose images into a sub-folder or remove them"
        )
    groups = [_images_under(p) for p in subfolders] if subfolders else [loose]
    if not any(groups):
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {str(root)!r}")

    rng = np.random.default_rng(seed)
    paths: list[Path] = []
    labels: list[int] = []
    for label, files in enumerate(groups):
        in_test = np.zeros(len(files), dtype=bool)
        in_test[_test_indices(len(files), test_fraction, rng)] = True
        keep = {"train": ~in_test, "test": in_test, "all": np.ones_like(in_test)}[split]
        chosen = [f for f, k in zip(files, keep, strict=True) if k]
        paths += chosen
        labels += [label] * len(chosen)
    mode = "L" if channels == 1 else "RGB"
    pixels = np.stack([_read(p, image_size, mode) for p in paths]) if paths else None
    if pixels is None:
        images = torch.zeros(0, channels, image_size, image_size)
    else:
        images = torch.from_numpy(pixels.astype(np.float32)).permute(0, 3, 1, 2) / 127.5 - 1.0
    return ImageDataset(
        name=f"folder:{root.name}",
        images=images.contiguous(),  # [N, C, H, W] in [−1, 1]
        labels={"class": torch.tensor(labels, dtype=torch.long)} if subfolders else {},
        label_names={"class": [p.name for p in subfolders]} if subfolders else {},
    )
