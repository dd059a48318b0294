"""Training recipes: one JSON file per zoo model in `models/recipes/`, and the task for each kind."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from models.training.trainer import TrainingTask

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """A recipe by zoo name (`digits-ddpm`) or by path to a JSON file."""
    path = Path(name_or_path)
    if not path.suffix:
        path = RECIPES_DIR / f"{name_or_path}.json"
    if not path.exists():
        available = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.json")))
        raise FileNotFoundError(f"no recipe {name_or_path!r}; available: {available}")
    return json.loads(path.read_text())


def build_task(recipe: dict[str, Any]) -> TrainingTask:
    kind = recipe["kind"]
    if kind in ("diffusion", "latent-diffusion"):
        from models.training.diffusion import DiffusionTask

        return DiffusionTask(recipe)
    if kind == "classifier":
        from models.training.classifiers import ClassifierTask

        return ClassifierTask(recipe)
    if kind == "noisy-classifier":
        from models.training.classifiers import NoisyClassifierTask

        return NoisyClassifierTask(recipe)
    if kind == "adversarial-autoencoder":
        from models.training.autoencoders import AdversarialTask

        return AdversarialTask(recipe)
    if kind in (
        "autoencoder",
        "denoising-autoencoder",
        "sparse-autoencoder",
        "vae",
        "vqvae",
        "kl-autoencoder",
    ):
        from models.training.autoencoders import AutoencoderTask

        return AutoencoderTask(recipe)
    raise ValueError(f"no training task for kind {kind!r}")
