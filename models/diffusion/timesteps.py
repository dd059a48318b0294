"""Which timesteps a sampler visits: strided sub-sequences (DDIM) and RePaint's jump schedule.

A *plan* is the list of timesteps one sample walks through, starting at the noisiest and ending at
−1 (ᾱ_{−1} = 1, the clean image). Consecutive entries (a, b) with b < a are denoising steps (one network
call at t = a); entries with b > a are RePaint's forward jumps back to more noise (no network call).
"""

from __future__ import annotations

from typing import Literal

TimestepSpacing = Literal["leading", "trailing"]


def timestep_sequence(num_train_steps: int, num_steps: int, spacing: TimestepSpacing) -> list[int]:
    """The sub-sequence τ of S = num_steps timesteps in [0, T), in sampling (descending) order.

    - ``leading`` (DDIM, Song et al. 2021): τ_i = i·⌊T/S⌋ for i = 0..S−1; never starts at T − 1.
    - ``trailing`` (Lin et al. 2024): τ_i = round(T − i·T/S) − 1; starts at T − 1.
    Both match diffusers' DDIMScheduler for the same `timestep_spacing`.
    """
    if not 1 <= num_steps <= num_train_steps:
        raise ValueError(f"num_steps must be in [1, {num_train_steps}], got {num_steps}")
    if spacing == "leading":
        ratio = num_train_steps // num_steps
        return [i * ratio for i in range(num_steps - 1, -1, -1)]
    if spacing == "trailing":
        ratio = num_train_steps / num_steps
        return [round(num_train_steps - i * ratio) - 1 for i in range(num_steps)]
    raise ValueError(f"unknown timestep spacing {spacing!r}; expected 'leading' or 'trailing'")


def denoising_plan(sequence: list[int]) -> list[int]:
    """Plain sampling: every timestep of the sequence once, then −1."""
    return [*sequence, -1]


def repaint_plan(sequence: list[int], jump_length: int, jump_n_sample: int) -> list[int]:
    """RePaint's resampling schedule (Lugmayr et al. 2022, §4.2) over a descending sequence.

    Walking down the S steps, every `jump_length` steps the sample jumps back up `jump_length`
    steps (re-noised by the forward process) and is denoised again, `jump_n_sample − 1` times per
    jump point; this harmonizes the generated region with the known one. Indices are positions in the
    sequence (0 = least noisy), mapped back to timesteps at the end.
    """
    if jump_length < 1 or jump_n_sample < 1:
        raise ValueError("jump_length and jump_n_sample must be ≥ 1")
    ascending = sequence[::-1]  # ascending[k] is the k-th least noisy timestep
    num_steps = len(sequence)
    jumps_left = {k: jump_n_sample - 1 for k in range(0, num_steps - jump_length, jump_length)}
    indices: list[int] = []
    k = num_steps
    while k >= 1:
        k -= 1
        indices.append(k)
        if jumps_left.get(k, 0) > 0:
            jumps_left[k] -= 1
            for _ in range(jump_length):
                k += 1
                indices.append(k)
    return [ascending[k] for k in indices] + [-1]
