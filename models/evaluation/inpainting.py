"""Inpainting quality: complete half-masked test images with RePaint and measure the completions.

RePaint (Lugmayr et al. 2022) conditions an unconditional sampler on the kept pixels: at every step
x_{t−1} = m ⊙ x_{t−1}^known + (1 − m) ⊙ x_{t−1}^unknown, with x_{t−1}^known ~ q(x_{t−1} | x_0),
and with `jump_n_sample` > 1 it re-noises by `jump_length` steps to harmonise the two regions.

Test image i keeps its left half (the right half is generated) when i is even and its top half when
i is odd. Reported: the mean squared error on the kept region (consistency: it should be ~0, the
known pixels are pasted in at t = 0) and on the generated region (distance to the original, not a
quality measure by itself: many completions are valid), and the evaluation classifier's accuracy on
the completed images against the originals' labels, beside its accuracy on the originals (ceiling)
and on the masked images with the hole filled by the background value −1 (floor).
"""

from __future__ import annotations

import torch


def half_masks(n: int, height: int, width: int) -> torch.Tensor:
    """[n, 1, H, W] masks, 1 = keep: left half for even rows, top half for odd rows."""
    masks = torch.zeros(n, 1, height, width)
    masks[0::2, :, :, : width // 2] = 1.0
    masks[1::2, :, : height // 2, :] = 1.0
    return masks


def masked_mse(a: torch.Tensor, b: torch.Tensor, region: torch.Tensor) -> float:
    """Mean of (a − b)² over the pixels where region = 1 (broadcast over channels), [−1, 1] scale."""
    weights = region.expand_as(a)
    total = weights.sum()
    if float(total) == 0.0:
        raise ValueError("the region is empty")
    return float(((a - b) ** 2 * weights).sum() / total)


def fill_hole(images: torch.Tensor, masks: torch.Tensor, value: float = -1.0) -> torch.Tensor:
    """The kept pixels with the generated region set to `value` (the floor's input)."""
    return images * masks + value * (1.0 - masks)
