"""Datasets, all local: digits ships inside scikit-learn, shapes is generated, folder reads a directory."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported lazily: models.data.text must stay importable without torch
    from models.data.dataset import ImageDataset


def __getattr__(name: str) -> object:
    if name == "ImageDataset":
        from models.data.dataset import ImageDataset

        return ImageDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_dataset(name: str, split: str = "train", **options: object) -> ImageDataset:
    """`digits`, `shapes` or `folder` (with `root=`), split `train`, `test` or `all`."""
    if name == "digits":
        from models.data.digits import load_digits

        return load_digits(split)
    if name == "shapes":
        from models.data.shapes import load_shapes

        return load_shapes(split, **options)  # type: ignore[arg-type]
    if name == "folder":
        from models.data.folder import load_folder

        return load_folder(split=split, **options)  # type: ignore[arg-type]
    raise ValueError(f"unknown dataset {name!r}; expected 'digits', 'shapes' or 'folder'")


__all__ = ["ImageDataset", "load_dataset"]
