"""Classifiers: augmentations, networks, and a few training steps exported to a zoo and loaded back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.diffusion.guidance import classifier_log_prob_gradient
from models.nets.classifier import (
    ClassifierConfig,
    ImageClassifier,
    NoisyClassifier,
    NoisyClassifierConfig,
)
from models.registry import find_entry, load_network
from models.training.classifiers import random_blur, random_shift
from models.training.recipes import build_task
from models.training.trainer import TrainConfig, Trainer


def test_random_shift_translates_within_bounds() -> None:
    image = torch.full((1, 1, 5, 5), -1.0)
    image[0, 0, 2, 2] = 1.0  # one bright pixel in the centre
    shifted = random_shift(image.expand(64, 1, 5, 5), 1, torch.Generator().manual_seed(0))
    positions = {tuple((s[0] == 1.0).nonzero()[0].tolist()) for s in shifted}
    assert positions == {(r, c) for r in (1, 2, 3) for c in (1, 2, 3)}
    assert torch.equal(random_shift(image, 0, torch.Generator()), image)


def test_random_blur_keeps_flat_images_and_softens_edges() -> None:
    flat = torch.full((4, 3, 8, 8), 0.3)
    assert torch.allclose(random_blur(flat, 1.0, torch.Generator().manual_seed(0)), flat)
    edge = torch.zeros(16, 1, 8, 8)
    edge[..., 4:] = 1.0
    blurred = random_blur(edge, 1.0, torch.Generator().manual_seed(0))
    assert float(blurred[:, 0, 0, 3].max()) > 0.0  # light spilled across the edge
    assert torch.equal(random_blur(edge, 0.0, torch.Generator()), edge)


def test_networks_shapes_and_batch_independence() -> None:
    torch.manual_seed(0)
    config = ClassifierConfig(
        in_channels=3, image_size=32, base_channels=4, heads={"shape": 4, "colour": 6}
    )
    classifier = ImageClassifier(config).eval()
    x = torch.randn(5, 3, 32, 32)
    logits = classifier(x)
    assert logits["shape"].shape == (5, 4) and logits["colour"].shape == (5, 6)
    assert classifier.features(x).shape == (5, classifier.config.feature_dim)
    noisy = NoisyClassifier(NoisyClassifierConfig(base_channels=8)).eval()
    x_t, t = torch.randn(6, 1, 16, 16), torch.tensor([0, 10, 100, 500, 900, 999])
    together = noisy(x_t, t)
    alone = torch.cat([noisy(x_t[i : i + 1], t[i : i + 1]) for i in range(6)])
    assert together.shape == (6, 10)
    assert torch.allclose(together, alone, atol=1e-5)
    grad = classifier_log_prob_gradient(noisy, x_t, t, torch.arange(6))
    assert grad.shape == x_t.shape and float(grad.abs().sum()) > 0


def _train(recipe: dict, tmp_path: Path) -> torch.nn.Module:
    task = build_task(recipe)
    config = TrainConfig(steps=3, batch_size=8, checkpoint_every=100, sample_every=0)
    Trainer(task, config, tmp_path / "run" / recipe["name"]).run(
        tmp_path / "zoo" / recipe["name"], progress=False
    )
    return load_network(find_entry(recipe["name"], tmp_path / "zoo"))


def test_classifier_tasks_train_export_and_load(tmp_path: Path) -> None:
    train = {"steps": 3, "batch_size": 8}
    evaluator = _train(
        {
            "name": "tiny-shapes-classifier",
            "kind": "classifier",
            "dataset": "shapes",
            "dataset_options": {"n": 32},
            "classifier": {"base_channels": 4, "channel_mults": [1, 2], "feature_dim": 8},
            "blur_probability": 0.5,
            "train": train,
        },
        tmp_path,
    )
    assert isinstance(evaluator, ImageClassifier)
    assert evaluator.config.heads == {"shape": 4, "colour": 6}
    entry = find_entry("tiny-shapes-classifier", tmp_path / "zoo")
    assert entry.kind == "classifier" and entry.network["label_names"]["shape"][0] == "circle"
    assert entry.dataset_options == {"n": 32}

    noisy = _train(
        {
            "name": "tiny-noisy",
            "kind": "noisy-classifier",
            "dataset": "digits",
            "guides": "digits-ddpm",
            "schedule": {"kind": "linear", "num_timesteps": 50},
            "classifier": {"base_channels": 4, "channel_mults": [1, 2]},
            "max_shift": 1,
            "train": train,
        },
        tmp_path,
    )
    assert isinstance(noisy, NoisyClassifier)
    entry = find_entry("tiny-noisy", tmp_path / "zoo")
    assert entry.kind == "noisy-classifier" and entry.schedule is not None
    assert entry.schedule.num_timesteps == 50 and entry.network["guides"] == "digits-ddpm"
    assert noisy(torch.randn(2, 1, 16, 16), torch.tensor([0, 49])).shape == (2, 10)


@pytest.mark.parametrize(
    "name", ["digits-eval-classifier", "shapes-eval-classifier", "digits-classifier"]
)
def test_shipped_classifiers_load_into_the_current_architecture(name: str) -> None:
    """The zoo's weights must fit the networks as the code builds them today (shared layers such as
    `ResidualBlock` change shape when their conditioning changes; retrain when this fails)."""
    try:
        entry = find_entry(name)
    except KeyError:
        pytest.skip(f"{name} is not in the zoo yet")
    network = load_network(entry)
    c, h, w = entry.image.channels, entry.image.height, entry.image.width
    x = torch.zeros(2, c, h, w)
    out = network(x, torch.tensor([0, 999])) if entry.kind == "noisy-classifier" else network(x)
    assert out is not None
