"""Training the classifiers: the evaluation classifier (clean images, one cross-entropy per label set)
and the noisy classifier of classifier guidance (Dhariwal & Nichol 2021), trained on

    x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε,   t ~ U{0, …, T − 1},   ε ~ N(0, I)

with the schedule of the diffusion model it guides, minimising −log f_φ(y | x_t, t).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.data import ImageDataset, load_dataset
from models.diffusion.forward import q_sample
from models.diffusion.schedule import NoiseSchedule
from models.nets.classifier import (
    ClassifierConfig,
    ImageClassifier,
    NoisyClassifier,
    NoisyClassifierConfig,
)
from models.registry import WEIGHTS_FILE, save_weights, write_entry
from models.training.trainer import TrainingTask


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ±max_shift pixels, filling with the edge pixels, [B, C, H, W]."""
    if max_shift <= 0:
        return images
    b, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=generator)
    return torch.stack(
        [padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets.tolist())]
    )


def random_blur(
    images: torch.Tensor, probability: float, generator: torch.Generator
) -> torch.Tensor:
    """Blur a random `probability` of the images by a random amount a ~ U(0, 1):
    x ← (1 − a) x + a (k ∗ x), k the 5×5 binomial kernel (≈ a Gaussian of σ = 1 pixel).

    Samples decoded by an autoencoder are slightly soft; a classifier that has seen soft images
    judges their content rather than their sharpness."""
    if probability <= 0:
        return images
    b, c, _, _ = images.shape
    taps = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    kernel = (taps[:, None] * taps[None, :] / 256.0).expand(c, 1, 5, 5)
    blurred = F.conv2d(F.pad(images, (2, 2, 2, 2), mode="replicate"), kernel, groups=c)
    chosen = torch.rand(b, generator=generator) < probability
    amount = torch.rand(b, generator=generator) * chosen  # [B], 0 for the untouched images
    a = amount[:, None, None, None]
    return (1.0 - a) * images + a * blurred


def _image_entry(data: ImageDataset) -> dict[str, int]:
    c, h, w = data.image_shape
    return {"channels": c, "height": h, "width": w}


class ClassifierTask(TrainingTask):
    """Recipe keys: name, dataset, dataset_options, classifier (ClassifierConfig minus `heads` and
    `in_channels`, which come from the data), max_shift and blur_probability (augmentation),
    train, entry."""

    def __init__(self, recipe: dict[str, Any]) -> None:
        self.recipe = recipe
        self.name = recipe["name"]
        options = recipe.get("dataset_options", {})
        self.data = load_dataset(recipe["dataset"], "train", **options)
        self.test = load_dataset(recipe["dataset"], "test", **options)
        channels, size, _ = self.data.image_shape
        heads = {name: len(names) for name, names in self.data.label_names.items()}
        self.config = ClassifierConfig.from_dict(
            {**recipe.get("classifier", {}), "in_channels": channels, "image_size": size}
            | {"heads": heads}
        )
        self.max_shift = int(recipe.get("max_shift", 0))
        self.blur_probability = float(recipe.get("blur_probability", 0.0))
        self.batch_size = int(recipe["train"]["batch_size"])

    def build_model(self) -> nn.Module:
        return ImageClassifier(self.config)

    def loss(
        self, model: nn.Module, step: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        index = torch.randint(0, len(self.data), (self.batch_size,), generator=generator)
        x = random_shift(self.data.images[index], self.max_shift, generator)  # [B, C, H, W]
        x = random_blur(x, self.blur_probability, generator)
        logits = model(x)
        losses, logs = [], {}
        for name, head_logits in logits.items():
            target = self.data.labels[name][index]
            losses.append(F.cross_entropy(head_logits, target))
            logs[f"acc_{name}"] = float((head_logits.argmax(1) == target).float().mean())
        return torch.stack(losses).sum(), logs

    @torch.no_grad()
    def test_accuracy(self, model: nn.Module) -> dict[str, float]:
        model.eval()
        logits = model(self.test.images)
        return {
            name: float((head.argmax(1) == self.test.labels[name]).float().mean())
            for name, head in logits.items()
        }

    def export(self, model: nn.Module, folder: Path) -> None:
        save_weights(model, folder / WEIGHTS_FILE)
        entry = dict(self.recipe.get("entry", {}))
        entry.update(
            name=self.name,
            kind="classifier",
            dataset=self.recipe["dataset"],
            image=_image_entry(self.data),
            network={"classifier": self.config.to_dict(), "label_names": self.data.label_names},
            files={**entry.get("files", {}), "weights": WEIGHTS_FILE},
        )
        if self.recipe.get("dataset_options"):  # e.g. a folder dataset's root, for evaluation
            entry["dataset_options"] = self.recipe["dataset_options"]
        write_entry(folder, entry)
        print(f"{self.name}: test accuracy {self.test_accuracy(model)}")


class NoisyClassifierTask(TrainingTask):
    """Recipe keys: name, dataset, classifier (NoisyClassifierConfig minus `in_channels`,
    `image_size`, `num_classes`), schedule (that of the guided model), guides, max_shift, train,
    entry."""

    def __init__(self, recipe: dict[str, Any]) -> None:
        self.recipe = recipe
        self.name = recipe["name"]
        self.data = load_dataset(recipe["dataset"], "train", **recipe.get("dataset_options", {}))
        if list(self.data.labels) != ["class"]:
            raise ValueError("the noisy classifier needs a dataset with one label set, 'class'")
        channels, size, _ = self.data.image_shape
        self.config = NoisyClassifierConfig.from_dict(
            {
                **recipe.get("classifier", {}),
                "in_channels": channels,
                "image_size": size,
                "num_classes": len(self.data.label_names["class"]),
            }
        )
        schedule = recipe.get("schedule", {})
        self.schedule = NoiseSchedule.create(
            schedule.get("kind", "linear"), schedule.get("num_timesteps", 1000)
        )
        self.max_shift = int(recipe.get("max_shift", 0))
        self.batch_size = int(recipe["train"]["batch_size"])

    def build_model(self) -> nn.Module:
        return NoisyClassifier(self.config)

    def loss(
        self, model: nn.Module, step: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        index = torch.randint(0, len(self.data), (self.batch_size,), generator=generator)
        x0 = random_shift(self.data.images[index], self.max_shift, generator)  # [B, C, H, W]
        t = torch.randint(0, self.schedule.num_timesteps, (self.batch_size,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        x_t = q_sample(self.schedule, x0, t, noise)
        target = self.data.labels["class"][index]
        logits = model(x_t, t)  # [B, K]
        accuracy = float((logits.argmax(1) == target).float().mean())
        return F.cross_entropy(logits, target), {"acc": accuracy}

    def export(self, model: nn.Module, folder: Path) -> None:
        save_weights(model, folder / WEIGHTS_FILE)
        entry = dict(self.recipe.get("entry", {}))
        entry.update(
            name=self.name,
            kind="noisy-classifier",
            dataset=self.recipe["dataset"],
            image=_image_entry(self.data),
            schedule={"kind": self.schedule.kind, "num_timesteps": self.schedule.num_timesteps},
            network={
                "noisy_classifier": self.config.to_dict(),
                "label_names": self.data.label_names,
                "guides": self.recipe.get("guides"),
            },
            files={**entry.get("files", {}), "weights": WEIGHTS_FILE},
        )
        if self.recipe.get("dataset_options"):  # e.g. a folder dataset's root, for evaluation
            entry["dataset_options"] = self.recipe["dataset_options"]
        write_entry(folder, entry)
