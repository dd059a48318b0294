"""Loading diffusers pipelines' components for the workers, through diffusers itself.

- The denoiser: the pipeline's `UNet2DModel` (unconditional or class-conditional), wrapped by
  `UNetAdapter` into ddserve's network signature ε_θ(x [N, C, H, W], t [N] long, cond [N] | None)
  → [N, C, H, W], so that the same `DenoisingBatch` drives it with per-sample settings and
  continuous batching (the pipeline's own `__call__` is never used to serve).
- The noise schedule and sampling options come from the scheduler config through
  `models.diffusion.scheduler_config.from_diffusers` (the worker's `ModelPool`).
- The first stage (`VQModel`, `AutoencoderKL`): `DiffusersCodec`, the `Codec` API of the zoo's
  autoencoders (`models.onnx.runtime`) on the diffusers module, for `/encode`, `/decode`,
  `/reconstruct` and for decoding a latent model's samples.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from models.catalog import ModelEntry
from models.onnx.runtime import Codec

log = logging.getLogger(__name__)


def require_diffusers() -> Any:
    """The diffusers module, or an error that says how to install it (the `diffusers` extra)."""
    try:
        import diffusers
    except ImportError as exc:
        raise RuntimeError(
            "serving or importing a diffusers pipeline needs the `diffusers` extra: "
            "pip install -e '.[diffusers]'"
        ) from exc
    return diffusers


class UNetAdapter(nn.Module):
    """A diffusers `UNet2DModel` as a ddserve network: (x [N, C, H, W], t [N] long,
    cond [N] long class ids | None) → the UNet's prediction [N, C, H, W] (ε, v or x_0, as its
    scheduler's `prediction_type` says).

    diffusers' UNet2DModel embeds t with sinusoidal (or Fourier) features of the integer timestep
    and adds `class_embedding(class_labels)` to the time embedding when `num_class_embeds` is set
    (the DDPM architecture of Ho et al. 2020 with the class embedding of Dhariwal & Nichol 2021)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.class_conditional = bool(getattr(unet.config, "num_class_embeds", None))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if self.class_conditional and cond is None:
            raise ValueError("this UNet is class-conditional: every row needs a class label")
        labels = cond.long() if self.class_conditional and cond is not None else None
        return self.unet(x, t, class_labels=labels).sample  # [N, C, H, W]


def load_unet(entry: ModelEntry, device: torch.device | str = "cpu") -> UNetAdapter:
    """The entry's UNet (its `component` sub-folder), fp32, eval, on `device`, wrapped."""
    unet_class = require_diffusers().UNet2DModel

    if entry.path is None:
        raise ValueError(f"model {entry.name!r} has no folder")
    unet = unet_class.from_pretrained(
        entry.path, subfolder=entry.component or "unet", low_cpu_mem_usage=False
    )
    return UNetAdapter(unet).to(device).eval().requires_grad_(False)


class DiffusersCodec(Codec):
    """encode / decode / reconstruct of a diffusers `VQModel` or `AutoencoderKL` (PyTorch).

    - KL: encode gives the posterior mean μ(x) (the zoo's VAEs do the same), decode D(z).
    - VQ: encode gives the pre-quantization latents h = quant_conv(E(x)) and their nearest codes
      k = argmin_k ‖h − e_k‖²; decode(latents) quantizes first (the decoder only sees code
      vectors, as `VQModel.decode` does), decode(codes) looks the vectors up.
    Latents are the autoencoder's own, unscaled: a latent diffusion model's `scaling_factor` is
    applied by the diffusion model (`DiffusionModel.to_pixels`)."""

    backend = "torch"
    # Convolutional: images of any H × W its factor f divides (a latent model's other sizes,
    # `ModelEntry.size_multiple`), latents [N, c, h, w] of any h × w (`Codec._check_images`).
    resizable = True

    def __init__(self, entry: ModelEntry, device: torch.device | str = "cpu") -> None:
        super().__init__(entry)
        diffusers = require_diffusers()

        if entry.path is None:
            raise ValueError(f"model {entry.name!r} has no folder")
        module_class = diffusers.VQModel if self.is_vq else diffusers.AutoencoderKL
        self.device = torch.device(device)
        self.model: Any = (
            module_class.from_pretrained(
                entry.path, subfolder=entry.component, low_cpu_mem_usage=False
            )
            .to(self.device)
            .eval()
            .requires_grad_(False)
        )

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    @staticmethod
    def _numpy(tensor: torch.Tensor) -> np.ndarray:
        return tensor.detach().float().cpu().numpy()

    @torch.no_grad()
    def encode(self, images: np.ndarray) -> dict[str, np.ndarray | None]:
        x = self._tensor(self._check_images(images))  # [N, C, H, W] in [−1, 1]
        if self.is_vq:
            h = self.model.encode(x).latents  # [N, D, h, w]
            return {"latents": self._numpy(h), "codes": self._nearest_codes(self._numpy(h))}
        mean = self.model.encode(x).latent_dist.mean  # [N, c, h, w]
        return {"latents": self._numpy(mean), "codes": None}

    @torch.no_grad()
    def posterior(self, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, σ) [N, c, h, w] each, on the CPU: an `AutoencoderKL`'s posterior
        N(μ(x), diag σ(x)²) of images [N, C, H, W] in [−1, 1] (an inpainting UNet's masked image
        is a sample of it, `models.diffusion.inpainting_unet`)."""
        if self.is_vq:
            raise ValueError(f"{self.name} is a VQ autoencoder: it has no posterior to sample")
        posterior = self.model.encode(self._tensor(self._check_images(images))).latent_dist
        return posterior.mean.float().cpu(), posterior.std.float().cpu()

    @torch.no_grad()
    def _decode_latents(self, latents: np.ndarray) -> np.ndarray:
        return self._numpy(self.model.decode(self._tensor(latents)).sample)

    @torch.no_grad()
    def _decode_codes(self, codes: np.ndarray) -> np.ndarray:
        index = self._tensor(codes)  # [N, h, w] int64
        vectors = self.model.quantize.embedding(index).permute(0, 3, 1, 2)  # [N, D, h, w]
        return self._numpy(self.model.decode(vectors, force_not_quantize=True).sample)

    @torch.no_grad()
    def _nearest_codes(self, latents: np.ndarray) -> np.ndarray:
        h = self._tensor(latents)  # [N, D, h, w]
        # VQModel's own quantizer (argmin of cdist to the codebook): the same ties as its decode.
        _, _, (_, _, index) = self.model.quantize(h)
        return index.reshape(h.shape[0], *h.shape[2:]).cpu().numpy().astype(np.int64)


def resizable_codec(codec: Codec, entry: ModelEntry, device: torch.device | str) -> Codec:
    """A codec of the first stage `entry` that encodes images and decodes latents of any size:
    `codec` itself when it takes any size (the diffusers module; ONNX graphs exported with dynamic
    height and width, `onnx_export`), else the diffusers module in PyTorch beside it (graphs
    exported before the spatial axes were dynamic have the model's own H × W)."""
    if codec.resizable:
        return codec
    log.warning(
        "model %s: its ONNX graphs have a fixed size (%d×%d); other sizes run in PyTorch through "
        "diffusers (`ddserve export %s` writes graphs that take any size)",
        entry.name,
        entry.image.width,
        entry.image.height,
        entry.name,
    )
    return DiffusersCodec(entry, device)
