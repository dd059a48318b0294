"""The Fréchet distance between Gaussians fitted to two sets of features (Heusel et al. 2017, FID).

    d²((μ₁, Σ₁), (μ₂, Σ₂)) = ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁^{½} Σ₂ Σ₁^{½})^{½}

(Dowson & Landau 1982). tr (Σ₁ Σ₂)^{½} is computed as tr (Σ₁^{½} Σ₂ Σ₁^{½})^{½}: the matrix is
symmetric positive semi-definite, so its square-root trace is the sum of the square roots of its
eigenvalues — stable where the general matrix square root of Σ₁ Σ₂ is not.

Here the features are an evaluation classifier's, not Inception's: the numbers compare models of
this zoo with each other and with the data floor (the same distance between the train and test
splits at the same sample count), never with published FIDs.
"""

from __future__ import annotations

import numpy as np


def gaussian_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] of features [N, D], in float64."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need features [N ≥ 2, D], got shape {features.shape}")
    x = features.astype(np.float64)
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """d² between N(μ₁, Σ₁) and N(μ₂, Σ₂) (the squared distance, as FID reports it)."""
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())
    distance = float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2))
    return max(distance - 2.0 * trace_sqrt, 0.0)


def feature_frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID-style d² between the Gaussians fitted to features [N, D] and [M, D]."""
    return frechet_distance(*gaussian_statistics(features_a), *gaussian_statistics(features_b))
