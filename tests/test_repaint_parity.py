"""RePaint on an imported `RePaintPipeline` gives diffusers' images, from the same PNG files.

Each case builds a tiny RePaintPipeline (a 32×32 `UNet2DModel`, `repaint_unet`, and a
`RePaintScheduler` of one β schedule) and inpaints the same image with the same mask twice:

- ddserve: the worker's path — an inpaint job spec carrying the two PNGs (`tests/specs.py`),
  `prepare_denoise` (the model's scheduler options, the image decoded to [−1, 1], the mask
  binarised), the model's `DenoisingBatch` — the settings the worker gives a request;
- diffusers: `RePaintPipeline.__call__` on the same PNGs as PIL images (its own preprocessing).

Mask: both sides mean the same thing, 1 = keep, 0 = generate. diffusers' `RePaintScheduler.step`
returns mask ⊙ x_known + (1 − mask) ⊙ x_unknown and its pipeline binarises a PIL mask at 0.5 of
255 (grey ≥ 128 → 1); ddserve's PNG mask is white = keep, thresholded at ≥ 128. So a mask file
means the same for both, and the test checks the two binarised masks are equal (a mask with 127
and 128 grey in it). (diffusers resizes a PIL mask to a multiple of 32 pixels, hence 32×32 here;
ddserve takes the model's exact size.)

Noise: no patching. ddserve's sample draws everything from its own generator
`noise.sample_generator(seed, 0)`; diffusers is handed a fresh generator of that seed, with batch
size 1 (with a list of generators RePaintPipeline draws x_T per image but every later draw from the
first generator alone, so only one image per call can match a per-image stream). The draws then
coincide one for one because ddserve, on a diffusers-convention model, draws as diffusers does
(`sampler.StepConvention`, 4): x_T; one z of the image's shape per reverse step, drawn even when
η = 0 and used both for the step's noise (η > 0) and for the known region's q(x_{t−1} | x_0); and
⌊T/S⌋ draws per jump back up (`RePaintScheduler.undo_step`, one per single step β). A different
count or order of draws moves the images by O(1) (the control case below), so agreement to 1e-4
is the check that the draws, the walk, the variance and the merge all match.

Tolerance: max |difference| ≤ 1e-4 on the [0, 1] images both return.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddserve.settings import Settings
from ddserve.spec import parse_job_spec
from models.diffusion.noise import sample_generator
from models.diffusion.sampler import Sample
from models.diffusion.timesteps import _jump_indices, diffusers_repaint_plan, repaint_plan
from tests import specs
from workers.execute import decode_image, prepare_denoise
from workers.model_pool import DiffusionModel, ModelPool

diffusers = pytest.importorskip("diffusers")

SIZE = 32
SEED = 11
TOLERANCE = 1e-4
# RePaintScheduler configs: diffusers' defaults (linear β, T = 1000, clip_sample); the cosine
# schedule at T = 100, where some step counts do not divide T; scaled_linear at T = 20 without
# clipping, where S = T makes each jump a single β step.
SCHEDULERS: dict[str, dict[str, object]] = {
    "repaint": {},
    "repaint-cos": {"num_train_timesteps": 100, "beta_schedule": "squaredcos_cap_v2"},
    "repaint-scaled": {
        "num_train_timesteps": 20,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "clip_sample": False,
    },
}


def repaint_unet() -> torch.nn.Module:
    """A UNet2DModel at 32×32 — diffusers' RePaintPipeline resizes a PIL mask to a multiple of 32
    pixels — kept as cheap as `tests/diffusers_fixtures.tiny_unet` at 16×16 (two levels of 16 and
    32 channels without attention): the (10, 10) case makes a hundred network calls a side."""
    torch.manual_seed(6)
    return diffusers.UNet2DModel(
        sample_size=SIZE,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repaint-pipelines")
    for name, config in SCHEDULERS.items():
        pipe = diffusers.RePaintPipeline(
            unet=repaint_unet(),
            scheduler=diffusers.RePaintScheduler(**config),  # type: ignore[arg-type]
        )
        pipe.save_pretrained(root / name)
    return root


@pytest.fixture(scope="module")
def pool(pipelines: Path) -> ModelPool:
    torch.set_num_threads(1)
    return ModelPool(Settings(model_dirs=str(pipelines), device="cpu"))


def png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def image_and_mask() -> tuple[np.ndarray, np.ndarray]:
    """An RGB image [32, 32, 3] and a grey mask [32, 32]: white (keep) but for a black square to
    generate, with a column of grey 128 (kept) and one of 127 (generated)."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    mask = np.full((SIZE, SIZE), 255, dtype=np.uint8)
    mask[8:24, 10:22] = 0
    mask[:, 2] = 128
    mask[:, 4] = 127
    return image, mask


def ddserve_inpaint(
    model: DiffusionModel, image: np.ndarray, mask: np.ndarray, **fields: object
) -> tuple[np.ndarray, Sample]:
    """The worker's image for an inpaint job [1, H, W, C] in [0, 1], and its sample."""
    spec = parse_job_spec(specs.inpaint(model.name, png(image), png(mask), seed=SEED, **fields))
    sample = prepare_denoise(spec, model, "job").samples[0]
    batch = model.new_batch()
    batch.add([sample])
    while len(batch):
        batch.step()
    return to_image(model, sample.x), sample


def to_image(model: DiffusionModel, x: torch.Tensor) -> np.ndarray:
    pixels = model.to_pixels(x[None])  # [1, C, H, W] in [−1, 1]
    return (pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def diffusers_inpaint(
    folder: Path, image: np.ndarray, mask: np.ndarray, steps: int, jump: tuple[int, int], eta: float
) -> np.ndarray:
    pipe = diffusers.RePaintPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        image=Image.fromarray(image),
        mask_image=Image.fromarray(mask),
        num_inference_steps=steps,
        eta=eta,
        jump_length=jump[0],
        jump_n_sample=jump[1],
        generator=sample_generator(SEED, 0),
        output_type="np",
    ).images


@pytest.mark.parametrize(
    ("name", "steps", "jump", "eta"),
    [
        ("repaint", 10, (1, 1), 0.0),  # no resampling: DDIM with the known region merged
        ("repaint", 10, (1, 1), 1.0),
        ("repaint", 11, (10, 10), 1.0),  # the pipeline's own (10, 10), at the smallest S taking it
        ("repaint-cos", 7, (3, 2), 0.5),  # ⌊T/S⌋ = 14, S ∤ T
        ("repaint-cos", 16, (4, 3), 1.0),
        ("repaint-scaled", 20, (5, 2), 1.0),  # S = T: one β per jump
        ("repaint-scaled", 12, (4, 3), 0.0),  # ⌊T/S⌋ = 1 but S < T
    ],
)
def test_repaint_pipeline(
    pool: ModelPool,
    pipelines: Path,
    name: str,
    steps: int,
    jump: tuple[int, int],
    eta: float,
) -> None:
    image, mask = image_and_mask()
    expected = diffusers_inpaint(pipelines / name, image, mask, steps, jump, eta)
    model = pool.get(name)
    assert isinstance(model, DiffusionModel)
    fields = dict(
        sampler=model.entry.defaults.sampler,  # type: ignore[union-attr]
        num_inference_steps=steps,
        eta=eta,
        jump_length=jump[0],
        jump_n_sample=jump[1],
    )
    got, sample = ddserve_inpaint(model, image, mask, **fields)
    assert sample.settings.sampler == "ddim" and sample.settings.convention == "diffusers"
    assert np.abs(got - expected).max() <= TOLERANCE
    keep = mask >= 128
    # The kept pixels are the image's, up to 8-bit rounding.
    assert np.abs(got[0][keep] - image[keep] / 255.0).max() <= 1e-5


def test_the_same_mask_file_means_the_same_to_both() -> None:
    """diffusers binarises a PIL mask at 0.5 (1 = keep); ddserve's worker at grey 128: equal."""
    from diffusers.pipelines.deprecated.repaint.pipeline_repaint import _preprocess_mask

    _, mask = image_and_mask()
    theirs = _preprocess_mask(Image.fromarray(mask))  # [1, H, W]
    ours = torch.from_numpy(decode_image(png(mask), 1, SIZE, SIZE, "mask")[..., 0] >= 128)
    assert torch.equal(theirs[0].bool(), ours)
    assert bool(ours[0, 2]) and not bool(ours[0, 4])  # 128 keeps, 127 generates


def test_the_paper_walk_differs_and_the_check_notices(pool: ModelPool, pipelines: Path) -> None:
    """The control: the same job in ddserve's own convention (the paper's walk and draws) is not
    diffusers' image — so the parity above is not a test that cannot fail."""
    image, mask = image_and_mask()
    model = pool.get("repaint")
    assert isinstance(model, DiffusionModel)
    expected = diffusers_inpaint(pipelines / "repaint", image, mask, 10, (2, 3), 1.0)
    fields = dict(num_inference_steps=10, eta=1.0, jump_length=2, jump_n_sample=3)
    spec = parse_job_spec(specs.inpaint("repaint", png(image), png(mask), seed=SEED, **fields))
    sample = prepare_denoise(spec, model, "job").samples[0]
    sample.settings = dataclasses.replace(sample.settings, convention="ddserve")
    batch = model.new_batch()
    batch.add([sample])
    while len(batch):
        batch.step()
    assert np.abs(to_image(model, sample.x) - expected).max() > 0.1


@pytest.mark.parametrize(
    ("total", "steps", "jump"),
    [(1000, 250, (10, 10)), (100, 7, (3, 2)), (20, 20, (5, 2)), (20, 12, (4, 3))],
)
def test_the_walks_positions_are_repaint_schedulers_timesteps(
    total: int, steps: int, jump: tuple[int, int]
) -> None:
    """`RePaintScheduler.set_timesteps` is the paper's positions times ⌊T/S⌋; ddserve's paper walk
    visits them as levels (then −1), diffusers' walk one position lower after the first."""
    scheduler = diffusers.RePaintScheduler(num_train_timesteps=total)
    scheduler.set_timesteps(steps, *jump)
    stride = total // steps
    positions = _jump_indices(steps, *jump)
    assert [k * stride for k in positions] == scheduler.timesteps.tolist()
    sequence = [k * stride for k in range(steps - 1, -1, -1)]
    assert repaint_plan(sequence, *jump) == [*scheduler.timesteps.tolist(), -1]
    walked = diffusers_repaint_plan(sequence, *jump)
    assert walked[0] == positions[0] * stride
    assert walked[1:] == [(k - 1) * stride if k > 0 else -1 for k in positions]
    # The same number of network calls (downward moves) either way.
    paper = repaint_plan(sequence, *jump)
    assert downward(walked) == downward(paper) == len(positions) - (len(positions) - steps) // 2


def downward(plan: list[int]) -> int:
    return sum(1 for a, b in itertools.pairwise(plan) if b < a)


def test_repaint_samples_mixed_with_others_end_as_alone(pool: ModelPool) -> None:
    """Batch invariance: diffusers-convention RePaint (jumps, η = 1: one z per step, ⌊T/S⌋ per
    jump), a paper-convention RePaint, plain inpainting and plain generation share one running set,
    joining at different steps; each ends as it does alone."""
    model = pool.get("repaint")
    assert isinstance(model, DiffusionModel)
    image, mask = image_and_mask()
    known = torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1.0  # [3, H, W]
    keep = torch.from_numpy(mask >= 128).float()[None]  # [1, H, W]
    options = model.scheduler
    repaint = options.settings("ddim", 8, eta=1.0, jump_length=2, jump_n_sample=3)
    plans = [
        (repaint, True, 1),
        (dataclasses.replace(repaint, convention="ddserve"), True, 2),
        (options.settings("ddpm", 6, jump_length=3, jump_n_sample=2), True, 3),
        (options.settings("ddim", 5, eta=0.5), True, 4),  # inpainting without jumps
        (options.settings("ddim", 6), False, 5),  # generation
        (options.settings("euler_ancestral", 5, jump_length=2, jump_n_sample=2), True, 6),
    ]

    def make(settings, inpaint: bool, seed: int) -> Sample:  # type: ignore[no-untyped-def]
        return Sample(
            settings=settings,
            generator=sample_generator(seed, 0),
            known=known if inpaint else None,
            mask=keep if inpaint else None,
        )

    alone = []
    for plan in plans:
        sample = make(*plan)
        batch = model.new_batch()
        batch.add([sample])
        while len(batch):
            batch.step()
        alone.append(sample.x)
    samples = [make(*plan) for plan in plans]
    batch = model.new_batch()
    batch.add(samples[:2])
    batch.step()
    batch.add(samples[2:4])
    batch.step()
    batch.step()
    batch.add(samples[4:])
    while len(batch):
        batch.step()
    for sample, expected in zip(samples, alone, strict=True):
        # Up to the float rounding of a batched network call, relative to the sample's scale: the
        # σ-space sampler does not clip x̂_0, and on a random UNet it ends at |x| ~ 10³.
        scale = max(1.0, float(expected.abs().max()))
        torch.testing.assert_close(sample.x, expected, rtol=1e-4, atol=1e-4 * scale)
