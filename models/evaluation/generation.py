"""Drawing evaluation samples from a zoo diffusion model with the project's sampler.

Conditions cycle through every class (digits: image i gets class i mod 10; shapes: image i gets
shape i mod 4 and colour ⌊i / 4⌋ mod 6, as the prompt "colour shape"), so any n ≥ the number of
combinations is balanced. Image i draws x_T and all later noise from its own stream
`sample_generator(seed, i)` (see `models.diffusion.noise`), so a setting's samples are reproducible
and independent of the batch size. Latent diffusion samples are decoded by the first stage:
x = D(z₀ / s), s = `latent_scale` (Rombach et al. 2022 §4.3.2).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from models.catalog import ModelEntry
from models.data.text import COLOURS, SHAPES, caption, encode_prompt
from models.diffusion.noise import sample_generator
from models.diffusion.sampler import SamplerSettings, sample
from models.diffusion.schedule import NoiseSchedule
from models.registry import find_entry, load_network

DIFFUSION_KINDS = ("diffusion", "latent-diffusion")


@dataclass(frozen=True)
class GenerationSetting:
    """One point of the sampler × steps × guidance grid `ddserve eval` measures."""

    sampler: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    guidance: float = 0.0  # classifier-free guidance w
    classifier_scale: float = 0.0  # classifier guidance s
    n: int = 500
    seed: int = 0

    @property
    def key(self) -> str:
        """The metrics.json key: `ddim-50-w3`, `ddpm-1000-w0`, `ddim-50-eta1-w0-s2`, …"""
        parts = [self.sampler, str(self.steps)]
        if self.sampler == "ddim" and self.eta != 0.0:
            parts.append(f"eta{self.eta:g}")
        parts.append(f"w{self.guidance:g}")
        if self.classifier_scale != 0.0:
            parts.append(f"s{self.classifier_scale:g}")
        return "-".join(parts)


@dataclass
class Conditions:
    cond: torch.Tensor | None  # [N] class ids or [N, L] token ids; None = unconditional
    targets: dict[str, torch.Tensor]  # label set → [N] intended labels (empty if unconditional)
    prompts: list[str] | None = None


def balanced_conditions(entry: ModelEntry, n: int) -> Conditions:
    """The conditions of n evaluation samples (see the module docstring)."""
    spec = entry.conditioning
    if spec is None:
        return Conditions(None, {})
    index = torch.arange(n)
    if spec.type == "class":
        labels = index % len(spec.classes or [])
        return Conditions(labels, {"class": labels})
    if entry.dataset != "shapes":
        raise ValueError(
            f"text-conditional evaluation is defined for shapes, not {entry.dataset!r}"
        )
    shape = index % len(SHAPES)
    colour = (index // len(SHAPES)) % len(COLOURS)
    prompts = [caption(COLOURS[c], SHAPES[s]) for s, c in zip(shape, colour, strict=True)]
    tokens = [encode_prompt(p, spec.vocabulary or [], spec.context_len or 0) for p in prompts]
    return Conditions(
        torch.tensor(tokens, dtype=torch.long), {"shape": shape, "colour": colour}, prompts
    )


@dataclass
class LoadedDiffusion:
    entry: ModelEntry
    network: nn.Module
    schedule: NoiseSchedule
    classifier: nn.Module | None  # the noisy classifier named by the entry, for guidance
    first_stage: nn.Module | None  # latent diffusion: the autoencoder that decodes latents
    latent_scale: float

    @property
    def sample_shape(self) -> tuple[int, ...]:
        if self.entry.kind == "latent-diffusion":
            if self.entry.latent_shape is None:
                raise ValueError(f"{self.entry.name} has no latent_shape in its config.json")
            return tuple(self.entry.latent_shape)
        image = self.entry.image
        return (image.channels, image.height, image.width)

    @property
    def clip_denoised(self) -> bool:
        if self.entry.defaults is not None:
            return self.entry.defaults.clip_denoised
        return self.entry.kind == "diffusion"  # pixels lie in [−1, 1]; latents do not

    def to_pixels(self, x0: torch.Tensor) -> torch.Tensor:
        """Samples in [−1, 1] pixel space: latents decoded, pixels clamped, [N, C, H, W]."""
        if self.first_stage is not None:
            with torch.no_grad():
                x0 = self.first_stage.decode(x0 / self.latent_scale)
        return x0.clamp(-1.0, 1.0)


def load_diffusion(
    entry: ModelEntry, zoo_dir: Path | str | None, need_classifier: bool
) -> LoadedDiffusion:
    if entry.kind not in DIFFUSION_KINDS or entry.schedule is None:
        raise ValueError(f"{entry.name} is a {entry.kind!r} model, not a diffusion model")
    classifier = None
    if need_classifier:
        if entry.classifier is None:
            raise ValueError(f"{entry.name} names no noisy classifier for classifier guidance")
        classifier = load_network(find_entry(entry.classifier, zoo_dir))
    first_stage = None
    if entry.kind == "latent-diffusion":
        if entry.first_stage is None:
            raise ValueError(f"latent model {entry.name} names no first_stage autoencoder")
        first_stage = load_network(find_entry(entry.first_stage, zoo_dir))
    return LoadedDiffusion(
        entry=entry,
        network=load_network(entry),
        schedule=NoiseSchedule.create(entry.schedule.kind, entry.schedule.num_timesteps),
        classifier=classifier,
        first_stage=first_stage,
        latent_scale=float(entry.network.get("latent_scale", 1.0)),
    )


def sampler_settings(
    model: LoadedDiffusion, setting: GenerationSetting, **extra: int
) -> SamplerSettings:
    return SamplerSettings(
        sampler=setting.sampler,  # type: ignore[arg-type]
        num_inference_steps=setting.steps,
        eta=setting.eta,
        guidance_scale=setting.guidance,
        classifier_scale=setting.classifier_scale,
        clip_denoised=model.clip_denoised,
        **extra,
    )


@torch.no_grad()
def generate(
    model: LoadedDiffusion,
    setting: GenerationSetting,
    conditions: Conditions,
    *,
    known: torch.Tensor | None = None,  # [N, *sample_shape] to inpaint
    mask: torch.Tensor | None = None,  # [N, 1 or C, H, W] 1 = keep
    settings: SamplerSettings | None = None,
    batch_size: int = 100,
    log: bool = True,
) -> torch.Tensor:
    """n = setting.n samples in pixel space [n, C, H, W], drawn batch by batch."""
    settings = settings or sampler_settings(model, setting)
    null = model.network.null_condition() if hasattr(model.network, "null_condition") else None
    cond_for_net = conditions.cond
    if cond_for_net is None and setting.guidance != 0.0:
        raise ValueError("classifier-free guidance needs conditions; this evaluation has none")
    class_labels = conditions.targets.get("class")
    if setting.classifier_scale != 0.0 and class_labels is None:
        raise ValueError("classifier guidance needs class labels")
    out = []
    for start in range(0, setting.n, batch_size):
        stop = min(start + batch_size, setting.n)
        generators = [sample_generator(setting.seed, i) for i in range(start, stop)]
        x_T = torch.stack([torch.randn(model.sample_shape, generator=g) for g in generators])
        x0 = sample(
            model.network,
            model.schedule,
            x_T,
            settings,
            cond=None if cond_for_net is None else cond_for_net[start:stop],
            null_condition=null,
            prediction_type=model.entry.prediction_type,
            classifier=model.classifier,
            class_labels=(
                None
                if model.classifier is None or class_labels is None
                else class_labels[start:stop].tolist()
            ),
            known=None if known is None else known[start:stop],
            mask=None if mask is None else mask[start:stop],
            generators=generators,
        )
        out.append(model.to_pixels(x0))
        if log:
            print(f"  sampled {stop}/{setting.n} ({setting.key})", file=sys.stderr, flush=True)
    return torch.cat(out)
