"""`digits`: scikit-learn's handwritten digits (1,797 images of 8×8, 10 classes), at 16×16 in [−1, 1].

The data ships inside scikit-learn (no network). Pixels 0..16 are scaled to [−1, 1] and upsampled
bilinearly to 16×16. The train/test split is fixed and stratified by class (80/20, seed 0).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from models.data.dataset import ImageDataset

CLASSES = [str(d) for d in range(10)]
IMAGE_SIZE = 16
SPLIT_SEED = 0
TEST_FRACTION = 0.2


def load_digits(split: str = "train") -> ImageDataset:
    """The `train`, `test` or `all` split of digits as an ImageDataset ([N, 1, 16, 16])."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    raw = sk_load_digits()
    images = torch.from_numpy(raw.images.astype(np.float32))[:, None] / 16.0 * 2.0 - 1.0
    images = F.interpolate(
        images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False
    )
    images = images.clamp(-1.0, 1.0)  # [1797, 1, 16, 16]
    labels = torch.from_numpy(raw.target.astype(np.int64))
    index = np.arange(len(labels))
    train_idx, test_idx = train_test_split(
        index, test_size=TEST_FRACTION, stratify=raw.target, random_state=SPLIT_SEED
    )
    chosen = {"train": train_idx, "test": test_idx, "all": index}.get(split)
    if chosen is None:
        raise ValueError(f"unknown split {split!r}; expected 'train', 'test' or 'all'")
    chosen_t = torch.from_numpy(np.sort(chosen))
    return ImageDataset(
        name="digits",
        images=images[chosen_t],
        labels={"class": labels[chosen_t]},
        label_names={"class": CLASSES},
    )
