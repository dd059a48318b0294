"""Vector quantization (van den Oord et al. 2017): a codebook e ∈ R^{K×D}, the nearest code
k(x) = argmin_j ‖z_e(x) − e_j‖² at each position, the straight-through estimator
z_q = z_e + sg[e_k − z_e] (the forward pass sees e_k, the backward pass copies ∂L/∂z_q to z_e), and

    L_vq = ‖sg[z_e] − e_k‖²  (codebook)  +  β·‖z_e − sg[e_k]‖²  (commitment), β = 0.25.

The codebook starts at encoder outputs of the first training batch (a data-dependent start, as in
k-means initializations), not at random vectors far from them. Codes the encoder stops choosing
never receive a gradient again; a running estimate of each code's
share of the positions flags those below `dead_share`/K, and they restart at encoder outputs drawn
from the current batch (the random restarts of Dhariwal et al. 2020, Jukebox).
Perplexity exp(−Σ_k p_k log p_k) of the code frequencies p measures how many codes are in use."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def code_perplexity(codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """exp(H(p)) of the code frequencies p over all positions of codes (any shape of indices)."""
    p = torch.bincount(codes.flatten(), minlength=codebook_size).float()
    p = p / p.sum()
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    return entropy.exp()


class VectorQuantizer(nn.Module):
    def __init__(
        self,
        codebook_size: int,
        dim: int,
        beta: float = 0.25,
        usage_decay: float = 0.99,
        dead_share: float = 0.03,
    ) -> None:
        super().__init__()
        self.codebook_size, self.dim, self.beta = codebook_size, dim, beta
        self.usage_decay, self.dead_share = usage_decay, dead_share
        self.codebook = nn.Parameter(
            torch.empty(codebook_size, dim).uniform_(-1 / codebook_size, 1 / codebook_size)
        )
        # running share of the positions assigned to each code (sums to 1)
        self.register_buffer("usage", torch.full((codebook_size,), 1.0 / codebook_size))
        self.register_buffer("initialized", torch.tensor(False))

    def nearest(self, z_e: torch.Tensor) -> torch.Tensor:
        """z_e [N, D, h, w] → code indices [N, h, w] (int64):
        argmin_j ‖z‖² − 2 z·e_j + ‖e_j‖² (‖z‖² is the same for every j and dropped)."""
        z = z_e.permute(0, 2, 3, 1)  # [N, h, w, D]
        distances = self.codebook.pow(2).sum(1) - 2 * z @ self.codebook.t()  # [N, h, w, K]
        return distances.argmin(dim=-1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [N, h, w] → code vectors [N, D, h, w]."""
        return F.embedding(codes, self.codebook).permute(0, 3, 1, 2)

    def forward(
        self, z_e: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z_q with the straight-through gradient [N, D, h, w], codes [N, h, w], L_vq)."""
        if self.training and not bool(self.initialized):
            self._start_at(z_e.detach(), torch.arange(self.codebook_size), generator)
            self.initialized.fill_(True)
        codes = self.nearest(z_e)
        e_k = self.lookup(codes)
        loss = F.mse_loss(e_k, z_e.detach()) + self.beta * F.mse_loss(z_e, e_k.detach())
        if self.training:
            self._restart_dead_codes(z_e.detach(), codes, generator)
        z_q = z_e + (e_k - z_e).detach()
        return z_q, codes, loss

    @torch.no_grad()
    def _restart_dead_codes(
        self, z_e: torch.Tensor, codes: torch.Tensor, generator: torch.Generator | None
    ) -> None:
        counts = torch.bincount(codes.flatten(), minlength=self.codebook_size).float()
        self.usage.lerp_(counts / counts.sum(), 1.0 - self.usage_decay)
        dead = torch.nonzero(self.usage < self.dead_share / self.codebook_size).flatten()
        if dead.numel() == 0:
            return
        self._start_at(z_e, dead, generator)
        self.usage[dead] = 1.0 / self.codebook_size

    @torch.no_grad()
    def _start_at(
        self, z_e: torch.Tensor, which: torch.Tensor, generator: torch.Generator | None
    ) -> None:
        """Set the codes `which` to encoder output vectors drawn at random from z_e."""
        vectors = z_e.permute(0, 2, 3, 1).reshape(-1, self.dim)  # [N·h·w, D]
        pick = torch.randint(vectors.shape[0], (which.numel(),), generator=generator)
        self.codebook[which.to(vectors.device)] = vectors[pick.to(vectors.device)]
