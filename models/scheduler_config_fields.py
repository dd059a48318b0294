"""The fields of a diffusers `scheduler/scheduler_config.json` that the gateway needs, without torch.

A diffusers pipeline names its noise scheduler by class (`_class_name`) and stores that class's
constructor arguments. The gateway only needs three facts from it — what the network predicts, how
many training timesteps there are (the upper bound of `num_inference_steps`) and which ddserve
sampler a request runs with when it names none — so `models.catalog` reads them here; the worker
reproduces the whole config with `models.diffusion.scheduler_config.from_diffusers` (torch).

Sampler per scheduler class (`SAMPLER_OF_CLASS`): each class whose update ddserve implements maps to
that sampler; PNDM and LMS (Stable Diffusion 1.x's defaults), which ddserve does not implement, map to
the closest deterministic sampler that reads the same fields (`default_sampler`'s docstring).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# diffusers scheduler class → ddserve sampler (models.diffusion.steps.SAMPLER_NAMES).
SAMPLER_OF_CLASS: dict[str, str] = {
    "DDPMScheduler": "ddpm",
    "DDIMScheduler": "ddim",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "UniPCMultistepScheduler": "unipc",
    # Not implemented in ddserve: the nearest implemented sampler of the same family (see
    # `default_sampler`).
    "PNDMScheduler": "ddim",
    "LMSDiscreteScheduler": "euler",
}
# DPMSolverMultistepScheduler's `algorithm_type` → ddserve sampler (the others are rejected).
DPM_SOLVER_ALGORITHMS: dict[str, str] = {
    "dpmsolver++": "dpmpp_2m",
    "sde-dpmsolver++": "dpmpp_2m_sde",
}
DPM_SOLVER_CLASS = "DPMSolverMultistepScheduler"
SUPPORTED_CLASSES: tuple[str, ...] = (*SAMPLER_OF_CLASS, DPM_SOLVER_CLASS)
# diffusers' `prediction_type` → ddserve's name (models.diffusion.sampler.SamplerPrediction).
PREDICTION_TYPES: dict[str, str] = {"epsilon": "epsilon", "v_prediction": "v", "sample": "sample"}

SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"


@dataclass(frozen=True)
class SchedulerFields:
    """What the gateway reads from a scheduler config."""

    class_name: str
    sampler: str  # the default ddserve sampler
    prediction_type: str  # ddserve's name: "epsilon", "v" or "sample"
    num_train_timesteps: int


def class_name(config: dict[str, Any]) -> str:
    """The config's `_class_name`, checked to be a scheduler ddserve reproduces."""
    name = config.get("_class_name")
    if not isinstance(name, str):
        raise ValueError("scheduler config has no _class_name")
    if name not in SUPPORTED_CLASSES:
        raise ValueError(
            f"scheduler {name!r} is not supported; expected one of {', '.join(SUPPORTED_CLASSES)}"
        )
    return name


def default_sampler(config: dict[str, Any]) -> str:
    """The ddserve sampler a request runs with on this model when it names none.

    DDPMScheduler → ddpm, DDIMScheduler → ddim, EulerDiscreteScheduler → euler,
    EulerAncestralDiscreteScheduler → euler_ancestral, UniPCMultistepScheduler → unipc,
    DPMSolverMultistepScheduler → dpmpp_2m (`algorithm_type="dpmsolver++"`) or dpmpp_2m_sde
    (`"sde-dpmsolver++"`); its first-order/non-++ variants are rejected.

    Not implemented here, mapped to the nearest sampler that reads the same fields:
    - PNDMScheduler (Liu et al. 2022, PLMS: a 4th-order linear multistep method on DDIM's
      deterministic ODE; SD 1.x's default) → ddim: the same ODE and timesteps (leading,
      `steps_offset`, `set_alpha_to_one`) integrated to first order; it converges to the same image
      as the steps grow;
    - LMSDiscreteScheduler (Karras et al. 2022's linear multistep in σ) → euler: the same σ-levels
      (and Karras option), first order.
    """
    name = class_name(config)
    if name == DPM_SOLVER_CLASS:
        algorithm = config.get("algorithm_type", "dpmsolver++")
        if algorithm not in DPM_SOLVER_ALGORITHMS:
            raise ValueError(
                f"DPMSolverMultistepScheduler algorithm_type {algorithm!r} is not supported; "
                f"expected one of {', '.join(DPM_SOLVER_ALGORITHMS)}"
            )
        return DPM_SOLVER_ALGORITHMS[algorithm]
    return SAMPLER_OF_CLASS[name]


def prediction_type(config: dict[str, Any]) -> str:
    """What the network predicts, in ddserve's words (diffusers' `v_prediction` is "v")."""
    value = config.get("prediction_type", "epsilon")
    if value not in PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type {value!r} is not supported; expected one of "
            f"{', '.join(PREDICTION_TYPES)}"
        )
    return PREDICTION_TYPES[value]


def num_train_timesteps(config: dict[str, Any]) -> int:
    """T: the length of the training schedule (`num_train_timesteps`, 1000 by default; the length of
    `trained_betas`, which must then agree with it)."""
    value = config.get("num_train_timesteps", 1000)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"num_train_timesteps must be a positive integer, got {value!r}")
    betas = config.get("trained_betas")
    if betas is not None:
        # A list from JSON; a tuple or an array from a live scheduler's `config`.
        if isinstance(betas, str | bytes | dict) or not hasattr(betas, "__len__") or not len(betas):
            raise ValueError("trained_betas must be a non-empty list of numbers")
        if "num_train_timesteps" in config and len(betas) != value:
            raise ValueError(
                f"trained_betas has {len(betas)} values but num_train_timesteps is {value}"
            )
        value = len(betas)
    return value


def read_fields(config: dict[str, Any]) -> SchedulerFields:
    """The gateway's view of a scheduler config; ValueError names what is unsupported."""
    return SchedulerFields(
        class_name=class_name(config),
        sampler=default_sampler(config),
        prediction_type=prediction_type(config),
        num_train_timesteps=num_train_timesteps(config),
    )


def load_scheduler_config(pipeline_dir: Path | str) -> dict[str, Any]:
    """`<pipeline_dir>/scheduler/scheduler_config.json` as a dict."""
    path = Path(pipeline_dir) / SCHEDULER_CONFIG
    config = json.loads(path.read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a JSON object")
    return config
