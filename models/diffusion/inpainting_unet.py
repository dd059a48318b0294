"""The extra input channels of an inpainting UNet (diffusers' `StableDiffusionInpaintPipeline` with
runwayml/stable-diffusion-inpainting's layout): the mask and the masked image's latents.

Such a UNet was trained to fill a masked region itself, so it is not driven by RePaint's
known-region replacement: at every step it reads, concatenated over channels,

    ε_θ(cat[x_t, m, z_m], t, c),   x_t [c, h, w] (scaled by `scale_model_input`),
    m [1, h, w]: the mask on the latent grid, 1 = repaint,
    z_m = s · (μ + σ·n) [c, h, w]: the first stage's posterior sample of the masked image
          x ⊙ (1 − M) (the region to repaint set to 0, mid-grey in [−1, 1]), scaled by s,

as the pipeline's `prepare_mask_latents` makes them: M is the pixel mask binarised at 0.5, m its
`torch.nn.functional.interpolate` (nearest) to h × w, and n ~ N(0, I) is drawn from the sample's own
stream right after x_T (`retrieve_latents`' "sample" mode with the row's generator, which the
pipeline calls after `prepare_latents`). With classifier-free guidance the unconditional row reads
the same m and z_m (the pipeline duplicates them). Both are fixed for the whole denoising, so they
travel with each sample (`Sample.masked_image`) and a running set of such samples — of different
masks, images, prompts, samplers and step counts — still makes one network call per step.

With `strength` s < 1 the pipeline starts, as img2img does, from the image's own latents noised to
the first step of the plan's tail (the last ⌊S·s⌋ of its S steps): z_0 = s_f · (μ' + σ'·n') is the
first stage's posterior sample of the whole (unmasked) image, n' drawn from the row's generator
*before* the starting noise ε (`prepare_latents` encodes the image, then draws ε), and the masked
image's n after both. `ImagePosterior` carries μ', σ' with the sample (`Sample.init_posterior`) and
is drawn when it joins, so the draws keep that order: n', ε, n (strength 1: ε, n).

ddserve's masks are white (1) = keep; the UNet's are 1 = repaint: `repaint_mask` translates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ImagePosterior:
    """The first stage's posterior N(μ, σ²) of an image, and its `scaling_factor` s: the image's
    latents are drawn from it (the pipeline's `retrieve_latents` in "sample" mode)."""

    mean: torch.Tensor  # [c, h, w] μ
    std: torch.Tensor  # [c, h, w] σ
    scaling_factor: float  # s

    def __post_init__(self) -> None:
        if self.mean.shape != self.std.shape:
            raise ValueError(
                f"mean {tuple(self.mean.shape)} and std {tuple(self.std.shape)} differ in shape"
            )

    def draw(self, generator: torch.Generator) -> torch.Tensor:
        """z_0 = s · (μ + σ·n) [c, h, w], n ~ N(0, I) the generator's next draw."""
        n = torch.randn(self.mean.shape, generator=generator)  # [c, h, w]
        return self.scaling_factor * (self.mean + self.std * n)


@dataclass(frozen=True)
class MaskedImageLatents:
    """What an inpainting UNet reads beside x_t for one image (module docstring)."""

    mask: torch.Tensor  # [1, h, w] m on the latent grid, 1 = repaint
    mean: torch.Tensor  # [c, h, w] μ of the first stage's posterior for the masked image
    std: torch.Tensor  # [c, h, w] σ of that posterior
    scaling_factor: float  # s, the first stage's `scaling_factor`

    def __post_init__(self) -> None:
        if self.mean.shape != self.std.shape or self.mask.shape != (1, *self.mean.shape[1:]):
            raise ValueError(
                f"mask {tuple(self.mask.shape)}, mean {tuple(self.mean.shape)} and std "
                f"{tuple(self.std.shape)} must be [1, h, w], [c, h, w] and [c, h, w]"
            )

    @property
    def channels(self) -> int:
        """Channels added to the UNet's input: 1 + c."""
        return 1 + self.mean.shape[0]

    def draw(self, generator: torch.Generator) -> torch.Tensor:
        """cat[m, s · (μ + σ·n)] [1 + c, h, w], n ~ N(0, I) the generator's next draw."""
        n = torch.randn(self.mean.shape, generator=generator)  # [c, h, w]
        latents = self.scaling_factor * (self.mean + self.std * n)
        return torch.cat([self.mask.to(latents), latents])


def repaint_mask(keep: torch.Tensor) -> torch.Tensor:
    """ddserve's mask (1 = keep, white in the PNG) [1, H, W] → the pipeline's (1 = repaint)."""
    return 1.0 - (keep >= 0.5).to(torch.float32)


def masked_pixels(image: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The pipeline's `image * (mask < 0.5)`: the image [C, H, W] in [−1, 1] with the region to
    repaint set to 0."""
    return image * (repaint_mask(keep) < 0.5)


def latent_repaint_mask(keep: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """m [1, h, w]: the repaint mask of `keep` [1, H, W] resized to the latent grid as the pipeline
    does (`interpolate`, nearest: each latent takes the top-left pixel of its f × f patch)."""
    return F.interpolate(repaint_mask(keep)[None], size=grid)[0]
