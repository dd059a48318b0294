"""`shapes`: procedurally generated 32×32 RGB images of one coloured shape on a plain background.

Each image holds one of four shapes (circle, square, triangle, cross) in one of six colours, with a
random size, position and rotation, on a constant dark-grey background. Every image carries its
labels (`shape`, `colour`) and a caption "colour shape" ("red triangle").

Drawing is vectorised: a shape is an indicator function of rotated coordinates

    u = cos θ · (x − c_x) + sin θ · (y − c_y),    v = −sin θ · (x − c_x) + cos θ · (y − c_y),

evaluated on a 4×-supersampled grid and averaged over each 4×4 block, which gives the pixel's
coverage α ∈ [0, 1] (anti-aliasing); the pixel is α · colour + (1 − α) · background.

The parameters of image i come from row i of one uniform matrix drawn from
`numpy.random.default_rng(seed)`, so a dataset is a pure function of (seed, n) and the first n
images of a larger set equal the set of n. Train and test use distinct fixed seeds.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from models.data.dataset import ImageDataset
from models.data.text import COLOURS, SHAPES, caption

IMAGE_SIZE = 32
SUPERSAMPLE = 4
TRAIN_SIZE = 6000
TEST_SIZE = 1000
TRAIN_SEED = 1_000
TEST_SEED = 2_000
RADIUS_RANGE = (5.0, 11.0)  # pixels: the shape's nominal radius r
EXTENT = 1.15  # every shape fits inside a disc of radius EXTENT · r around its centre
BACKGROUND = np.array([0.12, 0.12, 0.12], dtype=np.float32)  # in [0, 1]
COLOUR_RGB = np.array(
    [
        [0.92, 0.12, 0.12],  # red
        [0.15, 0.80, 0.20],  # green
        [0.20, 0.35, 0.95],  # blue
        [0.95, 0.90, 0.15],  # yellow
        [0.90, 0.20, 0.85],  # magenta
        [0.15, 0.88, 0.90],  # cyan
    ],
    dtype=np.float32,
)
_CHUNK = 512  # images rendered at once: bounds the supersampled buffer to ~40 MB


def _inside(kind: str, u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Indicator of the shape `kind` of nominal radius r ([B, 1, 1]) at rotated coords u, v.

    circle: u² + v² ≤ r²; square: max(|u|, |v|) ≤ 0.8 r; cross: two bars of half-length r and
    half-width 0.3 r; triangle: equilateral with circumradius 1.1 r, i.e. u·n_k ≤ 0.55 r for its
    three outward edge normals n_k at angles −π/2 + 2πk/3.
    """
    if kind == "circle":
        return u * u + v * v <= r * r
    if kind == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8 * r
    if kind == "cross":
        half = 0.3 * r
        au, av = np.abs(u), np.abs(v)
        return ((au <= half) & (av <= r)) | ((av <= half) & (au <= r))
    if kind == "triangle":
        inside = np.ones(u.shape, dtype=bool)
        for k in range(3):
            phi = -math.pi / 2 + 2 * math.pi * k / 3
            inside &= u * math.cos(phi) + v * math.sin(phi) <= 0.55 * r
        return inside
    raise ValueError(f"unknown shape {kind!r}; expected one of {SHAPES}")


def render_shapes(
    shape: np.ndarray,  # [N] int, index into SHAPES
    colour: np.ndarray,  # [N] int, index into COLOURS
    centre: np.ndarray,  # [N, 2] float pixels (x, y)
    radius: np.ndarray,  # [N] float pixels
    angle: np.ndarray,  # [N] float radians
) -> np.ndarray:
    """Draw the images: [N, 3, 32, 32] float32 in [0, 1] (anti-aliased by supersampling)."""
    n = len(shape)
    size = IMAGE_SIZE * SUPERSAMPLE
    grid = (np.arange(size, dtype=np.float32) + 0.5) / SUPERSAMPLE  # sample points, in pixels
    alpha = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    for kind_index, kind in enumerate(SHAPES):
        chosen = np.flatnonzero(shape == kind_index)
        for start in range(0, len(chosen), _CHUNK):
            idx = chosen[start : start + _CHUNK]
            dx = grid[None, None, :] - centre[idx, 0, None, None].astype(np.float32)  # [B, 1, S]
            dy = grid[None, :, None] - centre[idx, 1, None, None].astype(np.float32)  # [B, S, 1]
            cos = np.cos(angle[idx]).astype(np.float32)[:, None, None]
            sin = np.sin(angle[idx]).astype(np.float32)[:, None, None]
            u = cos * dx + sin * dy  # [B, S, S]
            v = -sin * dx + cos * dy  # [B, S, S]
            mask = _inside(kind, u, v, radius[idx].astype(np.float32)[:, None, None])
            blocks = mask.reshape(len(idx), IMAGE_SIZE, SUPERSAMPLE, IMAGE_SIZE, SUPERSAMPLE)
            alpha[idx] = blocks.mean(axis=(2, 4), dtype=np.float32)
    rgb = COLOUR_RGB[colour][:, :, None, None]  # [N, 3, 1, 1]
    a = alpha[:, None]  # [N, 1, 32, 32]
    return a * rgb + (1.0 - a) * BACKGROUND[None, :, None, None]


def generate_shapes(n: int, seed: int) -> ImageDataset:
    """`n` images drawn from `seed`; image i depends only on (seed, i)."""
    if n < 0:
        raise ValueError(f"n must be ≥ 0, got {n}")
    uniform = np.random.default_rng(seed).random((n, 6))  # row i = image i's parameters
    shape = np.minimum((uniform[:, 0] * len(SHAPES)).astype(np.int64), len(SHAPES) - 1)
    colour = np.minimum((uniform[:, 1] * len(COLOURS)).astype(np.int64), len(COLOURS) - 1)
    radius = RADIUS_RANGE[0] + uniform[:, 2] * (RADIUS_RANGE[1] - RADIUS_RANGE[0])
    margin = EXTENT * radius + 0.5
    centre = margin[:, None] + uniform[:, 3:5] * (IMAGE_SIZE - 2 * margin[:, None])  # [N, 2]
    angle = uniform[:, 5] * 2 * math.pi
    pixels = render_shapes(shape, colour, centre, radius, angle)  # [N, 3, 32, 32] in [0, 1]
    return ImageDataset(
        name="shapes",
        images=torch.from_numpy(pixels * 2.0 - 1.0),
        labels={"shape": torch.from_numpy(shape), "colour": torch.from_numpy(colour)},
        label_names={"shape": list(SHAPES), "colour": list(COLOURS)},
        captions=[caption(COLOURS[c], SHAPES[s]) for s, c in zip(shape, colour, strict=True)],
    )


def load_shapes(
    split: str = "train", n: int | None = None, seed: int | None = None
) -> ImageDataset:
    """The `train` (6,000 images, seed 1000) or `test` (1,000, seed 2000) split, or `all` of both.

    `n` and `seed` override the split's size and seed (any number of images, any seed).
    """
    defaults = {"train": (TRAIN_SIZE, TRAIN_SEED), "test": (TEST_SIZE, TEST_SEED)}
    if split == "all":
        if n is not None or seed is not None:
            raise ValueError("`n` and `seed` apply to the 'train' or 'test' split, not 'all'")
        train, test = load_shapes("train"), load_shapes("test")
        return ImageDataset(
            name="shapes",
            images=torch.cat([train.images, test.images]),
            labels={k: torch.cat([train.labels[k], test.labels[k]]) for k in train.labels},
            label_names=train.label_names,
            captions=[*(train.captions or []), *(test.captions or [])],
        )
    if split not in defaults:
        raise ValueError(f"unknown split {split!r}; expected 'train', 'test' or 'all'")
    default_n, default_seed = defaults[split]
    return generate_shapes(default_n if n is None else n, default_seed if seed is None else seed)
