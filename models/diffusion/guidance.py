"""Guidance: steering a sample towards a condition y at sampling time.

- Classifier-free guidance (Ho & Salimans 2022): one network trained with and without the
  condition (dropped with probability p_uncond) gives
      ε̃(x_t, t, y) = (1 + w) · ε(x_t, t, y) − w · ε(x_t, t, ∅);
  w = 0 is the plain conditional model. (diffusers' `guidance_scale` is 1 + w; ours is w.)
- Classifier guidance (Dhariwal & Nichol 2021): a classifier f_φ(y | x_t, t) trained on noisy images
  gives the gradient g = ∇_{x_t} log f_φ(y | x_t, t), which `steps.reverse_step` adds to the mean
  (DDPM) or subtracts from ε (DDIM), scaled by s.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ClassifierFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> logits [B, K]


def classifier_free_guidance(
    eps_cond: torch.Tensor,  # [G, C, H, W]
    eps_uncond: torch.Tensor,  # [G, C, H, W]
    scale: torch.Tensor,  # [G] w per row
) -> torch.Tensor:
    """ε̃ = (1 + w) ε_c − w ε_u, written as ε_c + w (ε_c − ε_u) to keep w = 0 exact."""
    w = scale.to(eps_cond).reshape(-1, *([1] * (eps_cond.dim() - 1)))
    return eps_cond + w * (eps_cond - eps_uncond)


def classifier_log_prob_gradient(
    classifier: ClassifierFn,
    x_t: torch.Tensor,  # [B, C, H, W]
    t: torch.Tensor,  # [B]
    labels: torch.Tensor,  # [B] long
) -> torch.Tensor:
    """g = ∇_{x_t} log f_φ(y | x_t, t) per row, [B, C, H, W].

    The rows are independent (the classifier has no batch coupling in eval mode), so the gradient of
    the summed log-probabilities gives each row its own gradient.
    """
    with torch.enable_grad():
        x = x_t.detach().requires_grad_(True)
        log_probs = torch.log_softmax(classifier(x, t), dim=-1)
        selected = log_probs.gather(1, labels.reshape(-1, 1)).sum()
        (grad,) = torch.autograd.grad(selected, x)
    return grad
