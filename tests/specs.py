"""Job specs for worker and engine tests, filled in as the gateway fills them (`service.normalize`):
tests name only what they vary, and every spec they enqueue is a valid, fully resolved one."""

from __future__ import annotations

from typing import Any

from ddserve.params import KARRAS_SAMPLERS, ORDER_SAMPLERS
from ddserve.spec import parse_job_spec

SAMPLING = {
    "n": 1,
    "sampler": "ddim",
    "num_inference_steps": 10,
    "eta": 0.0,
    "guidance_scale": 1.0,
    "clip_denoised": True,
    "seed": 0,
}


def _spec(fields: dict[str, Any]) -> dict[str, Any]:
    if "sampler" in fields:  # the solver options the gateway fills for the samplers taking them
        if fields["sampler"] in KARRAS_SAMPLERS:
            fields = {"use_karras_sigmas": False, **fields}
        if fields["sampler"] in ORDER_SAMPLERS:
            fields = {"solver_order": 2, **fields}
    return parse_job_spec(fields).to_json()  # type: ignore[union-attr]


def generate(model: str, **fields: Any) -> dict[str, Any]:
    """A generate spec for a diffusion model (DDIM-10, unguided, seed 0 unless given)."""
    return _spec(
        {"kind": "generate", "model": model, "classifier_scale": 0.0, **SAMPLING, **fields}
    )


def inpaint(model: str, image: str, mask: str, **fields: Any) -> dict[str, Any]:
    """An inpaint spec (RePaint with no jumps unless given)."""
    base = {"kind": "inpaint", "model": model, "image": image, "mask": mask, **SAMPLING}
    return _spec({**base, "jump_length": 1, "jump_n_sample": 1, **fields})


def img2img(model: str, image: str, **fields: Any) -> dict[str, Any]:
    """An image-to-image spec (strength 0.5 unless given)."""
    base = {"kind": "img2img", "model": model, "image": image, "strength": 0.5, **SAMPLING}
    return _spec({**base, "classifier_scale": 0.0, **fields})


def prior_sample(model: str, **fields: Any) -> dict[str, Any]:
    """A generate spec for a VAE/AAE (its prior, decoded)."""
    return _spec({"kind": "generate", "model": model, "n": 1, "seed": 0, **fields})


def codec(kind: str, model: str, **fields: Any) -> dict[str, Any]:
    """An encode / decode / reconstruct spec (reconstruct's seed 0 unless given)."""
    if kind == "reconstruct":
        fields.setdefault("seed", 0)
    return _spec({"kind": kind, "model": model, **fields})
