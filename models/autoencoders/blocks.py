"""Convolutional building blocks shared by the autoencoders: an encoder that halves the resolution
at each level with a strided convolution, a decoder that doubles it back (transposed convolution or
nearest upsampling + convolution), and the heads that turn the last feature map into a latent vector
or a latent feature map."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, Self

import torch
import torch.nn.functional as F
from torch import nn

from models.nets.layers import group_norm


@dataclass
class ConvConfig:
    """The architecture every autoencoder shares.

    `channels[i]` is the width at level i; there are len(channels) − 1 downsamplings, so the
    bottleneck feature map is image_size / 2^(len(channels) − 1) wide. `latent_dim` gives a vector
    latent [latent_dim] (through a linear layer); `latent_channels` a feature-map latent
    [latent_channels, h, w] (through a 1×1 convolution). Subclasses add the model's loss settings."""

    in_channels: int = 1
    image_size: int = 16
    channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    num_res_blocks: int = 0
    latent_dim: int | None = 32
    latent_channels: int | None = None
    upsample: Literal["transpose", "nearest"] = "nearest"

    def __post_init__(self) -> None:
        if (self.latent_dim is None) == (self.latent_channels is None):
            raise ValueError("set exactly one of latent_dim (vector) or latent_channels (map)")
        if self.image_size % self.downsampling != 0:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by {self.downsampling}"
            )

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.channels) - 1)

    @property
    def bottleneck_size(self) -> int:
        return self.image_size // self.downsampling

    @property
    def latent_shape(self) -> list[int]:
        if self.latent_dim is not None:
            return [self.latent_dim]
        h = self.bottleneck_size
        return [int(self.latent_channels or 0), h, h]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.in_channels, self.image_size, self.image_size

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Keys of this config only: config.json's `network` section may carry more (latent_std)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ResBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))) at constant width (He et al. 2016, pre-activation)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm1 = group_norm(channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = group_norm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


def _up(in_ch: int, out_ch: int, mode: str) -> nn.Module:
    if mode == "transpose":
        return nn.ConvTranspose2d(in_ch, out_ch, 4, stride=2, padding=1)  # exact ×2
    # nearest + 3×3 convolution: no checkerboard artefacts (Odena et al. 2016)
    return nn.Sequential(
        nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(in_ch, out_ch, 3, padding=1)
    )


class ConvEncoder(nn.Module):
    """x [N, C, H, W] → features [N, channels[-1], H/f, W/f] with f = 2^(levels − 1)."""

    def __init__(self, config: ConvConfig) -> None:
        super().__init__()
        ch = config.channels
        layers: list[nn.Module] = [nn.Conv2d(config.in_channels, ch[0], 3, padding=1), nn.SiLU()]
        for i, width in enumerate(ch):
            layers += [ResBlock(width) for _ in range(config.num_res_blocks)]
            if i + 1 < len(ch):
                layers += [nn.Conv2d(width, ch[i + 1], 3, stride=2, padding=1), nn.SiLU()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvDecoder(nn.Module):
    """features [N, channels[-1], h, w] → image [N, C, h·f, w·f] (no output squashing: the models
    clamp to [−1, 1] in `decode`, the losses see the raw output)."""

    def __init__(self, config: ConvConfig) -> None:
        super().__init__()
        ch = config.channels
        layers: list[nn.Module] = []
        for i in range(len(ch) - 1, -1, -1):
            layers += [ResBlock(ch[i]) for _ in range(config.num_res_blocks)]
            if i > 0:
                layers += [_up(ch[i], ch[i - 1], config.upsample), nn.SiLU()]
        layers.append(nn.Conv2d(ch[0], config.in_channels, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


class LatentHead(nn.Module):
    """features [N, C_f, h, w] → latent: [N, out] (vector, linear) or [N, out, h, w] (map, 1×1 conv)."""

    def __init__(self, config: ConvConfig, out: int) -> None:
        super().__init__()
        c, h = config.channels[-1], config.bottleneck_size
        self.vector = config.latent_dim is not None
        self.proj = nn.Linear(c * h * h, out) if self.vector else nn.Conv2d(c, out, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features.flatten(1) if self.vector else features)


class LatentInput(nn.Module):
    """latent [N, D] or [N, D, h, w] → features [N, C_f, h, w] for the decoder."""

    def __init__(self, config: ConvConfig, latent: int) -> None:
        super().__init__()
        self.c, self.h = config.channels[-1], config.bottleneck_size
        self.vector = config.latent_dim is not None
        if self.vector:
            self.proj: nn.Module = nn.Linear(latent, self.c * self.h * self.h)
        else:
            self.proj = nn.Conv2d(latent, self.c, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.vector:
            return F.silu(self.proj(z)).reshape(-1, self.c, self.h, self.h)
        return F.silu(self.proj(z))
