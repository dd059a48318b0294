"""The in-memory image dataset every loader returns: images in [−1, 1] with named label sets."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ImageDataset:
    name: str
    images: torch.Tensor  # [N, C, H, W] float32 in [−1, 1]
    labels: dict[str, torch.Tensor] = field(default_factory=dict)  # name → [N] long
    label_names: dict[str, list[str]] = field(default_factory=dict)  # name → class names
    captions: list[str] | None = None  # one per image (shapes: "red triangle")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def subset(self, index: torch.Tensor) -> ImageDataset:
        return ImageDataset(
            name=self.name,
            images=self.images[index],
            labels={k: v[index] for k, v in self.labels.items()},
            label_names=self.label_names,
            captions=None if self.captions is None else [self.captions[int(i)] for i in index],
        )

    def batch(self, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A random batch (with replacement across calls, without within): images and indices."""
        index = torch.randperm(len(self), generator=generator)[:size]
        return self.images[index], index
