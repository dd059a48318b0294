"""Training the autoencoders of the zoo: batches of clean images, each model's own loss
(`AutoencoderBase.loss`), and an export that writes the weights, config.json and the ONNX graphs
(checked against PyTorch) into the zoo folder. The adversarial autoencoder adds a second optimizer
for its discriminator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.autoencoders import AdversarialAutoencoder, AutoencoderBase, build_autoencoder
from models.autoencoders.vqvae import VQVAE
from models.data import load_dataset
from models.onnx.export import export_autoencoder
from models.registry import WEIGHTS_FILE, save_weights, write_entry
from models.training.trainer import TrainingTask, optimizer_step

GRID_IMAGES = 10  # test images shown (with their reconstructions) in the periodic grids


@torch.no_grad()
def latent_std(model: AutoencoderBase, images: torch.Tensor, batch_size: int = 256) -> float:
    """The standard deviation of encode(x) over all elements of all images (latent diffusion scales
    latents by 1 / latent_std, Rombach et al. 2022)."""
    latents = torch.cat(
        [model.encode(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    )
    return float(latents.std())


class AutoencoderTask(TrainingTask):
    """Recipe keys: name, kind, dataset, network (the model's config), train, entry."""

    def __init__(self, recipe: dict[str, Any]) -> None:
        self.recipe = recipe
        self.name = recipe["name"]
        self.kind = recipe["kind"]
        self.network = dict(recipe["network"])
        self.data = load_dataset(recipe["dataset"], "train", **recipe.get("dataset_options", {}))
        self.test = load_dataset(recipe["dataset"], "test", **recipe.get("dataset_options", {}))
        self.batch_size = int(recipe["train"]["batch_size"])

    def build_model(self) -> nn.Module:
        return build_autoencoder(self.kind, self.network)

    def batch(self, generator: torch.Generator) -> torch.Tensor:
        index = torch.randint(0, len(self.data), (self.batch_size,), generator=generator)
        return self.data.images[index]  # [B, C, H, W]

    def loss(
        self, model: nn.Module, step: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        return model.loss(self.batch(generator), generator)  # type: ignore[operator]

    def sample_images(self, model: nn.Module, generator: torch.Generator) -> torch.Tensor:
        """Test images, their reconstructions and (for VAE and AAE) prior samples, one row each."""
        originals = self.test.images[:GRID_IMAGES]
        rows = [originals, model.reconstruct(originals)]  # type: ignore[operator]
        if hasattr(model, "sample_prior"):
            rows.append(model.sample_prior(GRID_IMAGES, generator))
        return torch.cat(rows)

    def entry(self, model: AutoencoderBase) -> dict[str, Any]:
        """config.json's fields (files are added by `export`)."""
        c, h, w = self.data.image_shape
        entry = dict(self.recipe["entry"])
        entry.update(
            name=self.name,
            kind=self.kind,
            dataset=self.recipe["dataset"],
            image={"channels": c, "height": h, "width": w},
            latent_shape=model.latent_shape,
            network=model.config.to_dict(),
        )
        if isinstance(model, VQVAE):
            entry.update(code_shape=model.code_shape, codebook_size=model.config.codebook_size)
        if self.kind == "kl-autoencoder":
            entry["network"]["latent_std"] = latent_std(model, self.data.images)
        return entry

    def export(self, model: nn.Module, folder: Path) -> None:
        assert isinstance(model, AutoencoderBase)
        model = model.eval()
        save_weights(model, folder / WEIGHTS_FILE)
        entry = self.entry(model)
        onnx_files, _ = export_autoencoder(model, folder, self.test.images)
        entry["files"] = {**entry.get("files", {}), "weights": WEIGHTS_FILE, **onnx_files}
        write_entry(folder, entry)


class AdversarialTask(AutoencoderTask):
    """The AAE: the autoencoder's step (reconstruction + fooling the discriminator), then the
    discriminator's step on fresh prior samples against the (detached) codes of the same batch."""

    def parameter_groups(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        assert isinstance(model, AdversarialAutoencoder)
        return {
            "main": model.autoencoder_parameters(),
            "disc": list(model.discriminator.parameters()),
        }

    def training_step(
        self,
        model: nn.Module,
        optimizers: dict[str, torch.optim.Optimizer],
        step: int,
        generator: torch.Generator,
        grad_clip: float,
    ) -> dict[str, float]:
        assert isinstance(model, AdversarialAutoencoder)
        x = self.batch(generator)
        logs: dict[str, float] = {}
        for name, objective in (("main", model.loss), ("disc", model.discriminator_loss)):
            loss, step_logs = objective(x, generator)
            optimizer_step(optimizers[name], loss, grad_clip)
            logs.update(step_logs)
            if name == "main":
                logs["loss"] = float(loss.detach())
        return logs
