"""Per-sample noise streams.

Image i of a request draws all of its randomness — x_T, every step's z, RePaint's known-region and
jump noise — from its own generator seeded from (seed, i). What a sample draws therefore depends only
on its own seed, index and plan, never on which other samples share its batch: the same request gives
the same pixels alone or in any batch (up to the float rounding of a batched network call).
"""

from __future__ import annotations

import numpy as np
import torch


def stream_seed(seed: int, index: int) -> int:
    """A 63-bit seed for image `index` of a request seeded with `seed`, well mixed by SeedSequence."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, index]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def sample_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator for image `index` of the request seeded with `seed`."""
    return torch.Generator(device="cpu").manual_seed(stream_seed(seed, index))


def randn_like_rows(
    shape: tuple[int, ...],
    generators: list[torch.Generator],
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """One standard-normal draw of `shape` per generator, stacked: [len(generators), *shape]."""
    rows = [torch.randn(shape, generator=g) for g in generators]
    return torch.stack(rows).to(device=device, dtype=dtype)
