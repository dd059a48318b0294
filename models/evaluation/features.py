"""The evaluation classifier of a dataset as a measuring instrument: features φ(x) and predictions.

The zoo holds one per dataset, named `<dataset>-eval-classifier` (kind `classifier`); see
`models.nets.classifier.ImageClassifier`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.nets.classifier import ImageClassifier
from models.registry import find_entry, load_network


def eval_classifier_name(dataset: str) -> str:
    return f"{dataset}-eval-classifier"


@dataclass
class Measurements:
    features: np.ndarray  # [N, D] float64
    predicted: dict[str, torch.Tensor]  # label set → [N] long


@dataclass
class EvalClassifier:
    network: ImageClassifier
    label_names: dict[str, list[str]]
    name: str

    @torch.no_grad()
    def measure(self, images: torch.Tensor, batch_size: int = 500) -> Measurements:
        """Features and arg-max predictions of images [N, C, H, W] in [−1, 1]."""
        self.network.eval()
        features, predicted = [], {name: [] for name in self.label_names}
        for start in range(0, len(images), batch_size):
            phi = self.network.features(images[start : start + batch_size].float())  # [B, D]
            features.append(phi.double().numpy())
            for name, logits in self.network.logits_from_features(phi).items():
                predicted[name].append(logits.argmax(dim=1))
        return Measurements(
            features=np.concatenate(features),
            predicted={name: torch.cat(rows) for name, rows in predicted.items()},
        )


def load_eval_classifier(dataset: str, zoo_dir: Path | str | None = None) -> EvalClassifier:
    """The zoo's evaluation classifier of `dataset` (KeyError, naming it, when it is missing)."""
    name = eval_classifier_name(dataset)
    entry = find_entry(name, zoo_dir)
    network = load_network(entry)
    if not isinstance(network, ImageClassifier):
        raise TypeError(f"{name} is a {entry.kind!r} model, not an evaluation classifier")
    return EvalClassifier(network, dict(entry.network["label_names"]), name)
