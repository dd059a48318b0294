"""The contract between the gateway and the workers: how a request travels through Redis as an RQ job.

Both sides import this module (it needs neither torch nor FastAPI):
- one RQ queue per model, named `queue_name(prefix, model)`;
- the job calls `JOB_FUNCTION` with one keyword argument, `request`: the normalized request (every
  default filled in by the gateway from the model's catalog entry), a JSON-able dict whose `kind` is
  one of `JobKind`; uploaded images travel as base64 PNG strings;
- the worker writes progress into `job.meta[META_PROGRESS]` = {"step", "total"} (every few steps),
  the batch size it ran in into `job.meta[META_BATCH_SIZE]`, and returns a `JobOutput`-shaped dict
  whose images hold storage keys; the gateway turns keys into URLs when it answers;
- a cancel request adds the job id to the set `cancel_set_key(prefix)`; workers check it between
  denoising steps (RQ's own `cancel()` only removes a job from its queue).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, TypedDict

JOB_FUNCTION = "workers.execute.run_job"

META_OWNER = "owner"  # id of the API key that created the job (None with auth off)
META_KIND = "kind"
META_MODEL = "model"
META_PROGRESS = "progress"  # {"step": int, "total": int}
META_BATCH_SIZE = "batch_size"  # images (rows) in the network calls the job ran in (max)
META_REQUEST_ID = "request_id"
META_ERROR = "error"  # {"type", "code", "message"} of a failed job, written by the worker


class JobKind(StrEnum):
    GENERATE = "generate"
    ENCODE = "encode"
    DECODE = "decode"
    RECONSTRUCT = "reconstruct"
    INPAINT = "inpaint"


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})

# RQ's JobStatus values → ours.
_RQ_STATUS = {
    "queued": JobStatus.QUEUED,
    "deferred": JobStatus.QUEUED,
    "scheduled": JobStatus.QUEUED,
    "started": JobStatus.RUNNING,
    "finished": JobStatus.SUCCEEDED,
    "failed": JobStatus.FAILED,
    "stopped": JobStatus.CANCELED,
    "canceled": JobStatus.CANCELED,
}


def public_status(rq_status: str | None) -> JobStatus:
    """Our status for an RQ status string (an expired or unknown job reads as failed)."""
    # RQ's JobStatus is a str Enum whose str() is "JobStatus.QUEUED": use its value.
    return _RQ_STATUS.get(str(getattr(rq_status, "value", rq_status)), JobStatus.FAILED)


def queue_name(prefix: str, model: str) -> str:
    return f"{prefix}:{model}"


def cancel_set_key(prefix: str) -> str:
    return f"{prefix}:canceled"


class ImageRecord(TypedDict, total=False):
    key: str  # storage key of the PNG
    width: int
    height: int
    seed: int | None
    b64: str  # only when the request asked for output.return = "b64"


class JobOutput(TypedDict, total=False):
    images: list[ImageRecord]
    latents: list[Any] | None  # encode: [n, C, H, W] nested lists
    codes: list[Any] | None  # VQ-VAE encode: [n, H, W] code indices
    trajectory_key: str | None  # animated GIF of x_t, when asked for
    corrupted: list[ImageRecord] | None  # reconstruct with noise: the corrupted inputs


# --- The normalized requests the gateway enqueues (`request` of JOB_FUNCTION), by kind. ---
# Every field is present (defaults filled from the model's catalog entry); `seed` is always an int
# (the gateway draws one when the client sent null, so every job is reproducible). Uploaded images
# are re-encoded by the gateway as PNG of exactly the model's size, mode "L" (1 channel) or "RGB"
# (3 channels); inpainting masks as mode "L" PNG with values 255 (keep) or 0 (generate).


# output.return is "url" (default) or "b64"; "return" is a Python keyword, hence the functional form.
OutputSpec = TypedDict("OutputSpec", {"format": str, "return": str, "trajectory": bool})


class GenerateRequest(TypedDict):
    kind: str  # "generate"
    model: str
    n: int
    sampler: str  # "ddpm" | "ddim"
    num_inference_steps: int
    eta: float
    class_label: int | None
    prompt: str | None
    prompt_tokens: (
        list[int] | None
    )  # models.data.text.encode_prompt(prompt, vocabulary, context_len)
    guidance_scale: float  # 0 whenever there is no condition
    classifier_scale: float  # > 0 only with a class_label and a catalog `classifier`
    clip_denoised: bool
    seed: int
    output: OutputSpec


class PriorSampleRequest(TypedDict):
    """`generate` on a model without a diffusion schedule (VAE, AAE: `entry.schedule` is None):
    image i decodes z_i ~ N(0, I) of the model's latent_shape, z_i drawn from
    noise.sample_generator(seed, i)."""

    kind: str  # "generate"
    model: str
    n: int
    class_label: int | None  # only for a class-conditional model
    seed: int
    output: OutputSpec


class InpaintRequest(TypedDict):
    kind: str  # "inpaint"
    model: str
    image: str  # b64 PNG
    mask: str  # b64 PNG, 255 = keep, 0 = generate
    n: int
    sampler: str
    num_inference_steps: int
    eta: float
    jump_length: int
    jump_n_sample: int
    class_label: int | None
    prompt: str | None
    prompt_tokens: list[int] | None
    guidance_scale: float
    clip_denoised: bool
    seed: int
    output: OutputSpec


class EncodeRequest(TypedDict):
    kind: str  # "encode"
    model: str
    images: list[str]  # b64 PNG
    output: OutputSpec


class DecodeRequest(TypedDict):
    kind: str  # "decode"
    model: str
    latents: list[Any] | None  # [n, *latent_shape] floats, e.g. [n, C, H, W] or [n, D]
    codes: list[Any] | None  # [n, *code_shape] int code indices (VQ-VAE, models with code_shape)
    output: OutputSpec


class NoiseSpec(TypedDict):
    kind: str  # "gaussian" | "masking" | "salt_pepper"
    amount: float


class ReconstructRequest(TypedDict):
    kind: str  # "reconstruct"
    model: str
    images: list[str]  # b64 PNG
    noise: NoiseSpec | None
    seed: int  # the corruption noise of image i comes from noise.sample_generator(seed, i)
    output: OutputSpec
