"""Improved precision and recall (Kynkäänniemi et al. 2019) on feature vectors.

Each set approximates its manifold by the union of balls around its points, the radius of the ball
at φ being the distance to φ's k-th nearest neighbour within the same set (k = 3 in the paper):

    f(φ, Φ) = 1 if ‖φ − φ'‖₂ ≤ ‖φ' − NN_k(φ', Φ)‖₂ for some φ' ∈ Φ, else 0
    precision(Φ_r, Φ_g) = mean_{φ_g ∈ Φ_g} f(φ_g, Φ_r)   (samples that look real)
    recall(Φ_r, Φ_g)    = mean_{φ_r ∈ Φ_r} f(φ_r, Φ_g)   (real data the samples cover)
"""

from __future__ import annotations

import numpy as np
import torch

_CHUNK = 1024  # query rows per distance block: bounds memory at _CHUNK × N distances


def _distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cdist(a, b)  # [A, B] Euclidean, float64


def knn_radii(features: np.ndarray, k: int = 3) -> np.ndarray:
    """Distance from each point to its k-th nearest other point of the same set, [N]."""
    if k < 1 or len(features) <= k:
        raise ValueError(f"need more than k = {k} points, got {len(features)}")
    x = torch.from_numpy(features.astype(np.float64))
    radii = []
    for start in range(0, len(x), _CHUNK):
        d = _distances(x[start : start + _CHUNK], x)  # [chunk, N]; column of self is 0
        radii.append(d.kthvalue(k + 1, dim=1).values)  # k + 1: skip the point itself
    return torch.cat(radii).numpy()


def manifold_membership(
    reference: np.ndarray, radii: np.ndarray, queries: np.ndarray
) -> np.ndarray:
    """f(φ, Φ) for each query φ [M, D] against the balls of `reference` [N, D] with `radii` [N]."""
    ref = torch.from_numpy(reference.astype(np.float64))
    r = torch.from_numpy(radii.astype(np.float64))
    q = torch.from_numpy(queries.astype(np.float64))
    inside = [
        (_distances(q[start : start + _CHUNK], ref) <= r[None, :]).any(dim=1)
        for start in range(0, len(q), _CHUNK)
    ]
    return torch.cat(inside).numpy()


def precision_recall(real: np.ndarray, generated: np.ndarray, k: int = 3) -> tuple[float, float]:
    """(precision, recall) of `generated` [M, D] with respect to `real` [N, D]."""
    precision = manifold_membership(real, knn_radii(real, k), generated).mean()
    recall = manifold_membership(generated, knn_radii(generated, k), real).mean()
    return float(precision), float(recall)
