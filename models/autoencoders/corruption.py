"""The corruption processes of the denoising autoencoder (Vincent et al. 2010), for images in
[−1, 1]. The gateway's `/reconstruct` applies the same function to its `noise` option.

- `gaussian`: x̃ = x + σ·ε, ε ~ N(0, I), σ = amount (then clamped to the image range).
- `masking`: a fraction `amount` of the pixels, chosen at random, set to 0 intensity — the paper's
  "set to 0" for images in [0, 1], which is −1 (black) here.
- `salt_pepper`: a fraction `amount` of the pixels set to the minimum (−1) or the maximum (+1), each
  with probability ½.

A pixel is a spatial position: masking and salt-and-pepper corrupt all channels of a chosen pixel
alike. The fraction is exact: round(amount · H·W) pixels per image."""

from __future__ import annotations

from typing import Literal, get_args

import torch

NoiseKind = Literal["gaussian", "masking", "salt_pepper"]
NOISE_KINDS: tuple[str, ...] = get_args(NoiseKind)
LOW, HIGH = -1.0, 1.0


def chosen_pixels(
    n: int, height: int, width: int, fraction: float, generator: torch.Generator | None
) -> torch.Tensor:
    """A boolean mask [N, 1, H, W] with exactly round(fraction·H·W) True pixels per image."""
    count = round(fraction * height * width)
    scores = torch.rand((n, height * width), generator=generator)  # a random order per image
    ranks = scores.argsort(dim=1).argsort(dim=1)  # rank of each pixel in that order
    return (ranks < count).reshape(n, 1, height, width)


def corrupt(
    x: torch.Tensor, kind: str, amount: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """x [N, C, H, W] in [−1, 1] → x̃ of the same shape, with noise drawn from `generator` (CPU)."""
    if kind not in NOISE_KINDS:
        raise ValueError(f"unknown noise kind {kind!r}; expected one of {', '.join(NOISE_KINDS)}")
    if kind == "gaussian":
        if amount < 0:
            raise ValueError(f"gaussian noise needs σ ≥ 0, got {amount}")
        noise = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
        return (x + amount * noise).clamp(LOW, HIGH)
    if not 0.0 <= amount <= 1.0:
        raise ValueError(f"{kind} noise needs a fraction in [0, 1], got {amount}")
    n, _, h, w = x.shape
    mask = chosen_pixels(n, h, w, amount, generator).to(x.device)
    if kind == "masking":
        return x.masked_fill(mask, LOW)
    salt = torch.rand((n, 1, h, w), generator=generator).to(x.device) < 0.5
    values = torch.where(salt, HIGH, LOW).to(x.dtype)  # [N, 1, H, W], broadcast over channels
    return torch.where(mask, values, x)
