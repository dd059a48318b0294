"""Building blocks of the U-Net and the noisy classifier (after Ho et al. 2020 and Rombach et al. 2022)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(Q Kᵀ / √d) V over the last two axes (Vaswani et al. 2017).

    Written out rather than `F.scaled_dot_product_attention`, whose CPU path spends a tenth of a
    small U-Net's time checking masks it does not have."""
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    return scores.softmax(dim=-1) @ v


def group_norm(channels: int, min_group_size: int = 1) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups that divide the channel count and hold at least
    `min_group_size` channels each (per-sample statistics: batch-invariant).

    The U-Net uses groups of ≥ 4 channels, as DDPM's 32 groups of 128 channels do: a group of one
    channel (instance norm) would erase every per-channel constant, conditioning included."""
    groups = math.gcd(32, channels)
    while groups > 1 and channels // groups < min_group_size:
        groups //= 2
    return nn.GroupNorm(groups, channels)


UNET_GROUP_SIZE = 4


class SinusoidalEmbedding(nn.Module):
    """Transformer position encoding of t (Vaswani et al. 2017), as in DDPM:
    emb(t)_{2i} = sin(t / 10000^{2i/d}), emb(t)_{2i+1} = cos(t / 10000^{2i/d})."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.half = dim // 2
        # Its dtype follows the module's (`.to(torch.bfloat16)`) and is the output's; the angles
        # are always computed in float32: in bfloat16, t·freq for t ~ 1000 would be off by radians.
        self.register_buffer("freqs", self._freqs(torch.device("cpu")), persistent=False)

    def _freqs(self, device: torch.device) -> torch.Tensor:  # [dim/2] float32
        steps = torch.arange(self.half, dtype=torch.float32, device=device)
        return torch.exp(-math.log(10000.0) * steps / self.half)

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # [B] → [B, dim]
        freqs = self.freqs if self.freqs.dtype == torch.float32 else self._freqs(t.device)
        angles = t.float()[:, None] * freqs[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=-1).to(self.freqs.dtype)


def time_embedding(channels: int, emb_dim: int) -> nn.Sequential:
    """DDPM's timestep MLP: t [B] → sinusoidal emb(t) [B, channels] → Linear → SiLU → Linear →
    [B, emb_dim] (Ho et al. 2020, appendix B), added to every residual block."""
    return nn.Sequential(
        SinusoidalEmbedding(channels),
        nn.Linear(channels, emb_dim),
        nn.SiLU(),
        nn.Linear(emb_dim, emb_dim),
    )


class ResidualBlock(nn.Module):
    """GroupNorm → SiLU → conv, then the embedding e (time, class) as a scale and shift of the second
    normalization — h = GN(h)·(1 + s(e)) + b(e) (Nichol & Dhariwal 2021, "scale-shift norm") — →
    SiLU → conv, plus the skip. Conditioning after the norm survives it whatever the group size."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = group_norm(in_ch, UNET_GROUP_SIZE)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = group_norm(out_ch, UNET_GROUP_SIZE)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # [B, out, H, W]
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(
            2, dim=1
        )  # [B, out, 1, 1] each
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H·W positions of a feature map, with a residual."""

    def __init__(self, channels: int, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm = group_norm(channels, UNET_GROUP_SIZE)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # [B, heads, HW, c/heads]
        attended = attention(q, k, v)
        return x + self.out(attended.transpose(-1, -2).reshape(b, c, h, w))


class CrossAttention(nn.Module):
    """Attention from image positions (queries) to context tokens (keys, values), Rombach et al. 2022:
    softmax(Q Kᵀ / √d) V with Q = W_Q φ(x), K = W_K τ(y), V = W_V τ(y)."""

    def __init__(self, channels: int, context_dim: int, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm = group_norm(channels, UNET_GROUP_SIZE)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(context_dim, 2 * channels)
        self.out = nn.Linear(channels, channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape  # context: [B, L, context_dim]
        tokens = self.norm(x).reshape(b, c, h * w).transpose(1, 2)  # [B, HW, C]
        q = self.q(tokens).reshape(b, h * w, self.heads, c // self.heads).transpose(1, 2)
        k, v = self.kv(context).reshape(b, -1, 2, self.heads, c // self.heads).unbind(2)
        attended = attention(q, k.transpose(1, 2), v.transpose(1, 2))
        attended = attended.transpose(1, 2).reshape(b, h * w, c)  # [B, HW, C]
        return x + self.out(attended).transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TextEncoder(nn.Module):
    """τ(y): token ids [B, L] → context [B, L, D] — embeddings, positions and a small transformer.

    Token 0 is padding; a sequence of padding only is the null condition ∅ of classifier-free
    guidance, so its context is learned like any other."""

    def __init__(self, vocab_size: int, context_len: int, dim: int, layers: int = 1) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, dim)
        self.positions = nn.Parameter(torch.randn(context_len, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, nhead=4, dim_feedforward=2 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.tokens(ids) + self.positions[: ids.shape[1]])
