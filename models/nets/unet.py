"""ε_θ(x_t, t, c): the denoising U-Net (Ronneberger et al. 2015, as adapted by Ho et al. 2020).

Residual blocks with GroupNorm at each resolution, a sinusoidal embedding of t through an MLP added
to every block, self-attention at chosen resolutions, and skip connections from the down to the up
path. Conditioning:
- a class label through an embedding added to the time embedding; index `num_classes` is the learned
  null class ∅ used for classifier-free guidance;
- a token sequence (latent diffusion) through a small text encoder τ and cross-attention after each
  attention block (Rombach et al. 2022); the all-padding sequence is ∅.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.nets.config import NetConfig
from models.nets.layers import (
    UNET_GROUP_SIZE,
    CrossAttention,
    Downsample,
    ResidualBlock,
    SelfAttention,
    TextEncoder,
    Upsample,
    group_norm,
    time_embedding,
)


@dataclass(frozen=True)
class UNetConfig(NetConfig):
    TUPLE_FIELDS = ("channel_mults", "attention_resolutions")

    in_channels: int = 1
    out_channels: int | None = None  # defaults to in_channels
    image_size: int = 16
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (8,)
    heads: int = 4
    dropout: float = 0.0
    num_classes: int | None = None  # class-conditional when set
    vocab_size: int | None = None  # token-conditional (cross-attention) when set
    context_len: int = 8
    context_dim: int = 64
    text_layers: int = 1


class UNet(nn.Module):
    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        ch = config.base_channels
        emb_dim = 4 * ch
        self.time_embedding = time_embedding(ch, emb_dim)
        self.class_embedding = (
            nn.Embedding(config.num_classes + 1, emb_dim)
            if config.num_classes is not None
            else None
        )
        self.text_encoder = (
            TextEncoder(
                config.vocab_size, config.context_len, config.context_dim, config.text_layers
            )
            if config.vocab_size is not None
            else None
        )
        self.input_conv = nn.Conv2d(config.in_channels, ch, 3, padding=1)

        def attention(channels: int, resolution: int) -> nn.ModuleList:
            blocks: list[nn.Module] = []
            if resolution in config.attention_resolutions:
                blocks.append(SelfAttention(channels, config.heads))
                if self.text_encoder is not None:
                    blocks.append(CrossAttention(channels, config.context_dim, config.heads))
            return nn.ModuleList(blocks)

        # Down path: each entry is (residual block, attention blocks) or a Downsample.
        self.down = nn.ModuleList()
        skip_channels = [ch]
        channels, resolution = ch, config.image_size
        for level, mult in enumerate(config.channel_mults):
            for _ in range(config.num_res_blocks):
                block = ResidualBlock(channels, ch * mult, emb_dim, config.dropout)
                channels = ch * mult
                self.down.append(nn.ModuleList([block, attention(channels, resolution)]))
                skip_channels.append(channels)
            if level < len(config.channel_mults) - 1:
                self.down.append(Downsample(channels))
                resolution //= 2
                skip_channels.append(channels)

        self.mid_block1 = ResidualBlock(channels, channels, emb_dim, config.dropout)
        self.mid_attention = attention(channels, resolution) or nn.ModuleList(
            [SelfAttention(channels, config.heads)]
        )
        if self.text_encoder is not None and len(self.mid_attention) == 1:
            self.mid_attention.append(CrossAttention(channels, config.context_dim, config.heads))
        self.mid_block2 = ResidualBlock(channels, channels, emb_dim, config.dropout)

        # Up path: one more block per level than down, each consuming one skip connection.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mults))):
            for _ in range(config.num_res_blocks + 1):
                block = ResidualBlock(
                    channels + skip_channels.pop(), ch * mult, emb_dim, config.dropout
                )
                channels = ch * mult
                self.up.append(nn.ModuleList([block, attention(channels, resolution)]))
            if level > 0:
                self.up.append(Upsample(channels))
                resolution *= 2

        self.output = nn.Sequential(
            group_norm(channels, UNET_GROUP_SIZE),
            nn.SiLU(),
            nn.Conv2d(channels, config.out_channels or config.in_channels, 3, padding=1),
        )
        nn.init.zeros_(self.output[-1].weight)
        nn.init.zeros_(self.output[-1].bias)

    @property
    def conditional(self) -> bool:
        return self.class_embedding is not None or self.text_encoder is not None

    def null_condition(self) -> torch.Tensor | None:
        """The ∅ row for classifier-free guidance: the null class, or an all-padding sequence."""
        if self.class_embedding is not None:
            return torch.tensor(self.config.num_classes, dtype=torch.long)
        if self.text_encoder is not None:
            return torch.zeros(self.config.context_len, dtype=torch.long)
        return None

    def forward(
        self,
        x: torch.Tensor,  # [B, C, H, W]
        t: torch.Tensor,  # [B] long
        cond: torch.Tensor | None = None,  # [B] class ids or [B, L] token ids
    ) -> torch.Tensor:
        emb = self.time_embedding(t)  # [B, 4ch]
        context = None
        if self.class_embedding is not None:
            if cond is None:
                cond = self.null_condition().to(x.device).expand(x.shape[0])
            emb = emb + self.class_embedding(cond)
        elif self.text_encoder is not None:
            if cond is None:
                cond = self.null_condition().to(x.device).expand(x.shape[0], -1)
            context = self.text_encoder(cond)  # [B, L, D]

        h = self.input_conv(x)
        skips = [h]
        for module in self.down:
            if isinstance(module, Downsample):
                h = module(h)
            else:
                h = self._block(module, h, emb, context)
            skips.append(h)
        h = self.mid_block1(h, emb)
        h = self._attend(self.mid_attention, h, context)
        h = self.mid_block2(h, emb)
        for module in self.up:
            if isinstance(module, Upsample):
                h = module(h)
            else:
                h = self._block(module, torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.output(h)

    def _block(
        self,
        module: nn.ModuleList,
        h: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor | None,
    ) -> torch.Tensor:
        block, attention = module
        return self._attend(attention, block(h, emb), context)

    @staticmethod
    def _attend(
        blocks: nn.ModuleList, h: torch.Tensor, context: torch.Tensor | None
    ) -> torch.Tensor:
        for layer in blocks:
            h = layer(h, context) if isinstance(layer, CrossAttention) else layer(h)
        return h


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
