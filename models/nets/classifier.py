"""Classifiers of the zoo: the evaluation classifier and the noisy classifier of classifier guidance.

- `ImageClassifier`: a small CNN on clean images, with one linear head per label set (digits:
  `class`; shapes: `shape` and `colour`). Its penultimate activations φ(x) ∈ R^D are the features on
  which `models.evaluation` computes the Fréchet distance and precision/recall — the stand-in for
  Inception features (Heusel et al. 2017), which cannot be downloaded here.
- `NoisyClassifier`: f_φ(y | x_t, t) of Dhariwal & Nichol 2021 (§4), trained on noisy images
  x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε at uniform random t; its gradient ∇_{x_t} log f_φ(y | x_t, t) steers
  the sampler (`models.diffusion.guidance`). It is the down half of the U-Net: residual blocks that
  receive the sinusoidal timestep embedding, downsampling, then global average pooling and a linear
  layer (the paper pools with attention; on 16×16 digits an average suffices).

Both use GroupNorm, so a row's output never depends on the other rows of its batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from models.nets.config import NetConfig
from models.nets.layers import Downsample, ResidualBlock, group_norm, time_embedding


@dataclass(frozen=True)
class ClassifierConfig(NetConfig):
    TUPLE_FIELDS = ("channel_mults",)

    in_channels: int = 1
    image_size: int = 16
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 2)  # one level per entry; 2× downsampling between
    feature_dim: int = 64  # D of the evaluation features φ(x)
    heads: dict[str, int] = field(default_factory=lambda: {"class": 10})  # label set → K
    dropout: float = 0.1


class ImageClassifier(nn.Module):
    """x [B, C, H, W] in [−1, 1] → logits per head; `features(x)` → φ(x) [B, D]."""

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        channels = config.in_channels
        for level, mult in enumerate(config.channel_mults):
            out = config.base_channels * mult
            for conv_in in (channels, out):
                layers += [nn.Conv2d(conv_in, out, 3, padding=1), group_norm(out), nn.SiLU()]
            channels = out
            if level < len(config.channel_mults) - 1:
                layers.append(nn.AvgPool2d(2))
        self.trunk = nn.Sequential(*layers)
        self.project = nn.Linear(channels, config.feature_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.heads = nn.ModuleDict(
            {name: nn.Linear(config.feature_dim, k) for name, k in config.heads.items()}
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """φ(x) = SiLU(W · mean_{h,w} trunk(x)), [B, D]: the penultimate layer."""
        pooled = self.trunk(x).mean(dim=(2, 3))  # [B, C']
        return F.silu(self.project(pooled))

    def logits_from_features(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.dropout(features)
        return {name: head(h) for name, head in self.heads.items()}  # name → [B, K]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.logits_from_features(self.features(x))


@dataclass(frozen=True)
class NoisyClassifierConfig(NetConfig):
    TUPLE_FIELDS = ("channel_mults",)

    in_channels: int = 1
    image_size: int = 16
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    num_classes: int = 10
    dropout: float = 0.0


class NoisyClassifier(nn.Module):
    """f_φ(y | x_t, t): (x_t [B, C, H, W], t [B] long) → logits [B, num_classes]."""

    def __init__(self, config: NoisyClassifierConfig) -> None:
        super().__init__()
        self.config = config
        ch = config.base_channels
        emb_dim = 4 * ch
        self.time_embedding = time_embedding(ch, emb_dim)
        self.input_conv = nn.Conv2d(config.in_channels, ch, 3, padding=1)
        self.blocks = nn.ModuleList()
        channels = ch
        for level, mult in enumerate(config.channel_mults):
            for _ in range(config.num_res_blocks):
                self.blocks.append(ResidualBlock(channels, ch * mult, emb_dim, config.dropout))
                channels = ch * mult
            if level < len(config.channel_mults) - 1:
                self.blocks.append(Downsample(channels))
        self.norm = group_norm(channels)
        self.head = nn.Linear(channels, config.num_classes)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_embedding(t)  # [B, 4ch]
        h = self.input_conv(x)  # [B, ch, H, W]
        for block in self.blocks:
            h = block(h) if isinstance(block, Downsample) else block(h, emb)
        pooled = F.silu(self.norm(h)).mean(dim=(2, 3))  # [B, C']
        return self.head(pooled)  # [B, K]
