"""Which timesteps a sampler visits: strided sub-sequences (DDIM) and RePaint's jump schedule.

A *plan* is the list of timesteps one sample walks through, starting at the noisiest and ending at
−1 (ᾱ_{−1} = 1, the clean image). Consecutive entries (a, b) with b < a are denoising steps (one network
call at t = a); entries with b > a are RePaint's forward jumps back to more noise (no network call).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

TimestepSpacing = Literal["leading", "trailing", "linspace"]
TIMESTEP_SPACINGS: tuple[str, ...] = ("leading", "trailing", "linspace")


def _check(
    num_train_steps: int,
    num_steps: int,
    spacing: str,
    most: int | None = None,
    who: str = "",
    steps_offset: int = 0,
) -> None:
    """Reject step counts and offsets the spacing cannot lay out, naming the valid range."""
    most = num_train_steps if most is None else most
    if not 1 <= num_steps <= most:
        raise ValueError(
            f"num_steps must be in [1, {most}]{who} for {spacing!r} spacing of a "
            f"{num_train_steps}-step schedule, got {num_steps}"
        )
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(
            f"unknown timestep spacing {spacing!r}; expected one of {', '.join(TIMESTEP_SPACINGS)}"
        )
    if steps_offset < 0:
        raise ValueError(f"steps_offset must be ≥ 0, got {steps_offset}")


def _offset(timesteps: list[int], num_train_steps: int, steps_offset: int) -> list[int]:
    """``leading`` timesteps shifted by `steps_offset` (diffusers adds it to ``leading`` only), which
    must keep them inside the schedule (diffusers indexes past it: SD 1.x at S = T, issue #10003)."""
    shifted = [t + steps_offset for t in timesteps]
    if shifted and shifted[0] >= num_train_steps:
        raise ValueError(
            f"steps_offset {steps_offset} moves the first of {len(timesteps)} 'leading' timesteps to "
            f"{shifted[0]}, past the {num_train_steps}-step schedule; use fewer steps"
        )
    return shifted


def trailing_timesteps(num_train_steps: int, num_steps: int) -> list[int]:
    """``trailing`` spacing exactly as diffusers lays it: round(T − i·T/S) − 1 on the floats of
    `np.arange(T, 0, −T/S)`, whose accumulated rounding breaks the .5 ties of some S differently from
    exact arithmetic (S = 48 of 1000: 936, not 937), rounded half to even.

    For 62 of the counts S ≤ 1000 (61, 103, …) `np.arange` overshoots by one float ulp and yields
    an (S + 1)-th value ≈ 0, which diffusers turns into the timestep −1 (a network call at t = −1 that
    reads ᾱ_{T−1} through Python's negative indexing); it is dropped here, so the sequence is
    diffusers' less that invalid entry."""
    ratio = num_train_steps / num_steps
    points = np.round(np.arange(num_train_steps, 0, -ratio)).astype(np.int64) - 1
    return [int(t) for t in points if t >= 0]


def timestep_sequence(
    num_train_steps: int, num_steps: int, spacing: TimestepSpacing, steps_offset: int = 0
) -> list[int]:
    """The sub-sequence τ of S = num_steps timesteps in [0, T), in sampling (descending) order.

    - ``leading`` (DDIM, Song et al. 2021): τ_i = i·⌊T/S⌋ + steps_offset for i = S−1..0; never
      starts at T − 1 (Stable Diffusion 1.x: `steps_offset` = 1).
    - ``trailing`` (Lin et al. 2024, Table 2): τ_i = round(T − i·T/S) − 1; starts at T − 1 (see
      `trailing_timesteps` for diffusers' float ties).
    - ``linspace``: S points evenly spaced over [0, T − 1], rounded half to even.
    All three equal diffusers' DDIMScheduler / DDPMScheduler `set_timesteps` with the same
    `timestep_spacing` and `steps_offset` (which diffusers adds to ``leading`` only).
    """
    _check(num_train_steps, num_steps, spacing, steps_offset=steps_offset)
    if spacing == "leading":
        ratio = num_train_steps // num_steps
        leading = [i * ratio for i in range(num_steps - 1, -1, -1)]
        return _offset(leading, num_train_steps, steps_offset)
    if spacing == "trailing":
        return trailing_timesteps(num_train_steps, num_steps)
    points = np.linspace(0, num_train_steps - 1, num_steps).round()[::-1]
    return [int(t) for t in points]


def linspace_timesteps(num_train_steps: int, num_steps: int) -> list[float]:
    """S points evenly spaced over [0, T − 1], descending, not rounded (Euler's fractional t), in
    float32 as diffusers' Euler classes lay them (`np.linspace(..., dtype=np.float32)`): these are
    the timesteps the network is called with, so they are diffusers' to the bit."""
    points = np.linspace(0, num_train_steps - 1, num_steps, dtype=np.float32)[::-1]
    return [float(t) for t in points]


def multistep_timesteps(
    num_train_steps: int, num_steps: int, spacing: TimestepSpacing, steps_offset: int = 0
) -> list[int]:
    """The S timesteps of the multistep solvers (DPM-Solver, UniPC), descending.

    These lay S + 1 points and drop the last (t = 0), then take their last step to σ = 0; so
    ``leading`` is τ_i = i·⌊T/(S + 1)⌋ + steps_offset for i = S..1 and ``linspace`` the S + 1 points
    of [0, T − 1] rounded, less 0; ``trailing`` is the same as `timestep_sequence`'s. This is
    diffusers' DPMSolverMultistepScheduler / UniPCMultistepScheduler convention.
    """
    _check(
        num_train_steps,
        num_steps,
        spacing,
        num_train_steps - 1,
        " (multistep solvers)",
        steps_offset,
    )
    if spacing == "leading":
        ratio = num_train_steps // (num_steps + 1)
        leading = [i * ratio for i in range(num_steps, 0, -1)]
        return _offset(leading, num_train_steps, steps_offset)
    if spacing == "linspace":
        points = np.linspace(0, num_train_steps - 1, num_steps + 1).round()[::-1][:-1]
        return [int(t) for t in points]
    return timestep_sequence(num_train_steps, num_steps, spacing)


def euler_timesteps(
    num_train_steps: int, num_steps: int, spacing: TimestepSpacing, steps_offset: int = 0
) -> list[float]:
    """The S timesteps of the Euler samplers, descending: `timestep_sequence` for ``leading`` and
    ``trailing``, and for ``linspace`` the fractional points of [0, T − 1] (diffusers'
    EulerDiscreteScheduler / EulerAncestralDiscreteScheduler interpolate σ between table entries)."""
    _check(num_train_steps, num_steps, spacing, steps_offset=steps_offset)
    if spacing == "linspace":
        return linspace_timesteps(num_train_steps, num_steps)
    return [float(t) for t in timestep_sequence(num_train_steps, num_steps, spacing, steps_offset)]


def denoising_plan(sequence: list[int]) -> list[int]:
    """Plain sampling: every timestep of the sequence once, then −1."""
    return [*sequence, -1]


def _jump_indices(num_steps: int, jump_length: int, jump_n_sample: int) -> list[int]:
    """RePaint's walk over the positions 0 … S − 1 of a sequence (0 = least noisy), as the
    paper's `get_schedule_jump` lays it: down one position at a time; at every `jump_length`-th
    position below S − `jump_length`, back up `jump_length` positions, `jump_n_sample − 1` times."""
    if jump_length < 1 or jump_n_sample < 1:
        raise ValueError("jump_length and jump_n_sample must be ≥ 1")
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
    return indices


def repaint_plan(sequence: list[int], jump_length: int, jump_n_sample: int) -> list[int]:
    """RePaint's resampling schedule (Lugmayr et al. 2022, §4.2) over a descending sequence.

    Walking down the S steps, every `jump_length` steps the sample jumps back up `jump_length`
    steps (re-noised by the forward process) and is denoised again, `jump_n_sample − 1` times per
    jump point; this harmonizes the generated region with the known one. The entries of
    `_jump_indices` are the levels the sample visits, then −1: the paper's code (its
    `get_schedule_jump` and the loop over its consecutive pairs), ddserve's own convention.
    """
    ascending = sequence[::-1]  # ascending[k] is the k-th least noisy timestep
    indices = _jump_indices(len(sequence), jump_length, jump_n_sample)
    return [ascending[k] for k in indices] + [-1]


def diffusers_repaint_plan(sequence: list[int], jump_length: int, jump_n_sample: int) -> list[int]:
    """RePaint's schedule as diffusers' `RePaintPipeline` walks `RePaintScheduler.set_timesteps`.

    diffusers keeps the same positions (`_jump_indices`, without the final −1) but reads each entry
    e as the timestep its iteration acts at: below its predecessor, the network is called at e and
    the sample lands one position lower (e − 1); above it, `undo_step` re-noises the sample from
    e − 2 to e − 1. Either way the sample is at position e − 1 after entry e (position −1 being
    the clean image), so the levels it visits are the first entry, then every entry less one:

        paper:     k_0, k_1, …, k_N, −1
        diffusers: k_0, k_1 − 1, …, k_N − 1        (k_N = 0: ends at −1 too)

    The same number of network calls, but every jump starts one position lower than the paper's,
    the lowest from the clean image itself (position −1 back to 0).
    """
    ascending = sequence[::-1]
    indices = _jump_indices(len(sequence), jump_length, jump_n_sample)
    return [ascending[indices[0]]] + [ascending[k - 1] if k >= 1 else -1 for k in indices]


def sdedit_start(num_steps: int, strength: float) -> int:
    """Where an image-to-image sample (SDEdit, Meng et al. 2022) joins a plan of S steps: its index.

    SDEdit perturbs the input x_0 by the forward process up to t_0 = strength·T and solves the
    reverse process from there. On a discrete plan this is diffusers' img2img arithmetic
    (`StableDiffusionImg2ImgPipeline.get_timesteps`), in the same float expression:

        init = min(⌊S·strength⌋, S),   t_start = max(S − init, 0)

    and the sample takes the plan's steps t_start, …, S − 1 (S − t_start = init network calls).
    A strength so small that ⌊S·strength⌋ = 0 leaves no step to take: ValueError.
    """
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    init = min(int(num_steps * strength), num_steps)
    if init == 0:
        raise ValueError(
            f"strength {strength} of {num_steps} steps takes no denoising step "
            f"(⌊steps·strength⌋ = 0): use strength ≥ {1 / num_steps:.4g} or more steps"
        )
    return max(num_steps - init, 0)
