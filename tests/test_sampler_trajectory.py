"""Regression: a kept trajectory holds copies of x_t. On the CPU a view of the batch tensor would be
overwritten later by RePaint's in-place forward jumps (found by the worker's engine tests)."""

from __future__ import annotations

import torch

from models.diffusion.noise import sample_generator
from models.diffusion.sampler import DenoisingBatch, Sample, SamplerSettings
from models.diffusion.schedule import NoiseSchedule


def test_trajectory_frames_are_not_changed_by_later_jumps() -> None:
    schedule = NoiseSchedule.create("linear", 1000)

    def eps(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        return 0.5 * x  # [N, C, H, W]

    settings = SamplerSettings("ddim", 6, jump_length=2, jump_n_sample=3)
    known = torch.zeros(1, 4, 4)
    mask = torch.zeros(1, 4, 4)
    mask[..., :2] = 1.0
    sample = Sample(settings, sample_generator(0, 0), known=known, mask=mask, keep_trajectory=True)
    batch = DenoisingBatch(eps, schedule, (1, 4, 4))
    batch.add([sample])
    seen = [sample.trajectory[0].clone()]
    while len(batch):
        batch.step()
        seen.append(sample.trajectory[-1].clone())  # x_t right after the step that made it
    assert len(sample.trajectory) == len(seen) > 7  # RePaint went back up at least once
    for frame, snapshot in zip(sample.trajectory, seen, strict=True):
        assert torch.equal(frame, snapshot)
