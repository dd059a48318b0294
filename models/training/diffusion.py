"""Training a (latent) diffusion model: L_simple with t ~ U[0, T) and the condition dropped with
probability p_uncond (Ho & Salimans 2022), so one network serves both ε(x, t, y) and ε(x, t, ∅).

Latent diffusion (Rombach et al. 2022) trains the same objective on z = E(x) · c of a frozen
first-stage autoencoder E, with c = 1 / std(z) over the training set so that the latents have unit
variance like the images the schedule was designed for; samples are decoded as D(z / c)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.data import load_dataset
from models.diffusion.losses import diffusion_loss
from models.diffusion.sampler import SamplerSettings, sample
from models.diffusion.schedule import NoiseSchedule
from models.nets.unet import UNet, UNetConfig
from models.registry import WEIGHTS_FILE, save_weights, write_entry
from models.training.trainer import TrainingTask


class DiffusionTask(TrainingTask):
    """Recipe keys: name, dataset, unet, schedule, prediction_type, min_snr_gamma, p_uncond, entry."""

    def __init__(self, recipe: dict[str, Any]) -> None:
        self.recipe = recipe
        self.name = recipe["name"]
        self.data = load_dataset(recipe["dataset"], "train", **recipe.get("dataset_options", {}))
        self.unet_config = UNetConfig.from_dict(recipe["unet"])
        schedule = recipe.get("schedule", {})
        self.schedule = NoiseSchedule.create(
            schedule.get("kind", "linear"), schedule.get("num_timesteps", 1000)
        )
        self.prediction_type = recipe.get("prediction_type", "epsilon")
        self.min_snr_gamma = recipe.get("min_snr_gamma")
        self.p_uncond = float(recipe.get("p_uncond", 0.1))
        self.batch_size = int(recipe["train"]["batch_size"])
        self.first_stage: nn.Module | None = None
        self.latent_scale = 1.0
        self.x0 = self.data.images  # [N, C, H, W]
        if recipe["kind"] == "latent-diffusion":
            self.x0 = self._encode_latents(recipe["first_stage"])  # [N, c, h, w]
        self.conditions = self._conditions()

    def _encode_latents(self, first_stage: str) -> torch.Tensor:
        """z · c for every training image, with c = 1 / std(z) (Rombach et al. 2022, §4.3.2)."""
        from models.registry import find_entry, load_network

        self.first_stage = load_network(find_entry(first_stage, self.recipe.get("zoo_dir")))
        with torch.no_grad():
            latents = torch.cat(
                [self.first_stage.encode(chunk) for chunk in self.data.images.split(256)]
            )
        self.latent_scale = float(1.0 / latents.std())
        return latents * self.latent_scale

    def _conditions(self) -> torch.Tensor | None:
        """Per-image condition rows: class ids [N], or caption token ids [N, L] for text models."""
        if self.unet_config.num_classes is not None:
            return self.data.labels["class"]
        if self.unet_config.vocab_size is not None:
            from models.data.text import encode_prompt

            vocabulary = self.recipe["entry"]["conditioning"]["vocabulary"]
            tokens = [
                encode_prompt(c, vocabulary, self.unet_config.context_len)
                for c in self.data.captions
            ]
            return torch.tensor(tokens, dtype=torch.long)
        return None

    def build_model(self) -> nn.Module:
        return UNet(self.unet_config).to(memory_format=torch.channels_last)

    def loss(
        self, model: nn.Module, step: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        index = torch.randint(0, self.x0.shape[0], (self.batch_size,), generator=generator)
        x0 = self.x0[index].contiguous(memory_format=torch.channels_last)
        cond = None
        if self.conditions is not None:
            cond = self.conditions[index].clone()
            drop = torch.rand(cond.shape[0], generator=generator) < self.p_uncond
            cond[drop] = model.null_condition()
        loss = diffusion_loss(
            lambda x, t: model(x, t, cond),
            self.schedule,
            x0,
            prediction_type=self.prediction_type,
            min_snr_gamma=self.min_snr_gamma,
            generator=generator,
        )
        return loss, {}

    def sample_images(self, model: nn.Module, generator: torch.Generator) -> torch.Tensor:
        """DDIM-50 samples over the data's first distinct conditions, decoded for latent models."""
        n = 24
        x_T = torch.randn((n, *self.x0.shape[1:]), generator=generator)
        cond = None
        if self.conditions is not None:
            distinct = torch.unique(self.conditions, dim=0)  # [K] classes or [K, L] captions
            cond = distinct[torch.arange(n) % distinct.shape[0]]
        latent = self.first_stage is not None
        settings = SamplerSettings(
            "ddim", 50, guidance_scale=2.0 if cond is not None else 0.0, clip_denoised=not latent
        )
        out = sample(
            model,
            self.schedule,
            x_T,
            settings,
            cond=cond,
            null_condition=model.null_condition(),
            prediction_type=self.prediction_type,
        )
        if self.first_stage is not None:
            return self.first_stage.decode(out / self.latent_scale)
        return out

    def export(self, model: nn.Module, folder: Path) -> None:
        save_weights(model, folder / WEIGHTS_FILE)
        entry = dict(self.recipe["entry"])
        entry.update(
            name=self.name,
            dataset=self.recipe["dataset"],
            schedule={"kind": self.schedule.kind, "num_timesteps": self.schedule.num_timesteps},
            prediction_type=self.prediction_type,
            network={"unet": self.unet_config.to_dict(), "latent_scale": self.latent_scale},
            files={**entry.get("files", {}), "weights": WEIGHTS_FILE},
        )
        write_entry(folder, entry)
