"""The request and response bodies of the HTTP contract, with their limits in the schema.

Optional sampling fields are `null` by default and mean "the model's default" (its catalog entry's
`defaults`, shown by `GET /models`); the gateway fills them in before it queues the job, and the
job's `input` shows the values used. Limits that depend on the model (num_inference_steps ≤ T,
class_label < number of classes, prompt words, image size) are checked against the catalog and
answered with a 422 naming the field.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ddserve.jobs import JobKind, JobStatus
from models.catalog import Conditioning, ImageSpec, SamplingDefaults, ScheduleSpec

MAX_IMAGES = 16
MAX_SEED = 2**63 - 1

_REQUEST_CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)

ModelName = Field(
    min_length=1,
    max_length=64,
    pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-]*$",
    description="a model of `GET /models`",
    examples=["digits-ddpm"],
)
Seed = Field(
    None,
    ge=0,
    le=MAX_SEED,
    description="noise seed; image i uses the stream (seed, i). null = a random seed, reported in "
    "the job's input",
)
Sampler = Field(None, description="ddpm (ancestral) or ddim (strided, with eta); null = default")
Steps = Field(
    None, ge=1, le=10000, description="denoising steps, ≤ the model's T; null = the model's default"
)
Eta = Field(None, ge=0.0, le=1.0, description="DDIM's η (0 = deterministic); null = default")
ClassLabel = Field(
    None, ge=0, description="class index (< the model's number of classes); null = unconditional"
)
Prompt = Field(
    None,
    min_length=1,
    max_length=256,
    description="words from the model's vocabulary (text-conditioned models); null = unconditional",
)
GuidanceScale = Field(
    None,
    ge=0.0,
    le=20.0,
    description="classifier-free guidance w: ε̃ = (1 + w)·ε(x, t, y) − w·ε(x, t, ∅); 0 = none; "
    "null = the model's default when a condition is given, else 0",
)
ImageB64 = Field(
    description="base64 PNG of the model's size (grayscale or RGB; alpha is composited on white)"
)


class OutputOptions(BaseModel):
    model_config = _REQUEST_CONFIG

    format: Literal["png"] = Field("png", description="image format of the outputs")
    return_: Literal["url", "b64"] = Field(
        "url", alias="return", description="url: signed, expiring links; b64: inline base64 PNG"
    )
    trajectory: bool = Field(False, description="also return an animated GIF of x_t")


class GenerateBody(BaseModel):
    """`POST /generate`: sample n images from a diffusion model."""

    model_config = ConfigDict(
        **_REQUEST_CONFIG,
        json_schema_extra={
            "examples": [
                {
                    "model": "digits-ddpm",
                    "n": 4,
                    "sampler": "ddim",
                    "num_inference_steps": 50,
                    "eta": 0.0,
                    "class_label": 7,
                    "guidance_scale": 3.0,
                    "seed": 1234,
                }
            ]
        },
    )

    model: str = ModelName
    n: int = Field(1, ge=1, le=MAX_IMAGES, description="number of images")
    sampler: Literal["ddpm", "ddim"] | None = Sampler
    num_inference_steps: int | None = Steps
    eta: float | None = Eta
    class_label: int | None = ClassLabel
    prompt: str | None = Prompt
    guidance_scale: float | None = GuidanceScale
    classifier_scale: float | None = Field(
        None,
        ge=0.0,
        le=100.0,
        description="classifier guidance s with the model's noisy classifier (needs class_label); "
        "0 = none; null = the model's default",
    )
    seed: int | None = Seed
    output: OutputOptions = Field(default_factory=OutputOptions)


class InpaintBody(BaseModel):
    """`POST /inpaint`: RePaint — fill the black (0) region of `mask` in `image`, n variations."""

    model_config = _REQUEST_CONFIG

    model: str = ModelName
    image: str = ImageB64
    mask: str = Field(
        description="base64 PNG of the image's size: white (255) = keep, black (0) = generate"
    )
    n: int = Field(1, ge=1, le=MAX_IMAGES, description="number of inpainted variations")
    sampler: Literal["ddpm", "ddim"] | None = Sampler
    num_inference_steps: int | None = Steps
    eta: float | None = Eta
    jump_length: int | None = Field(
        None, ge=1, le=1000, description="RePaint's jump length j; null = default"
    )
    jump_n_sample: int | None = Field(
        None, ge=1, le=20, description="RePaint's resampling count r (1 = none); null = default"
    )
    class_label: int | None = ClassLabel
    prompt: str | None = Prompt
    guidance_scale: float | None = GuidanceScale
    seed: int | None = Seed
    output: OutputOptions = Field(default_factory=OutputOptions)


class EncodeBody(BaseModel):
    """`POST /encode`: images → latents (or VQ code indices)."""

    model_config = _REQUEST_CONFIG

    model: str = ModelName
    images: list[str] = Field(min_length=1, max_length=MAX_IMAGES, description="base64 PNGs")
    output: OutputOptions = Field(default_factory=OutputOptions)


class DecodeBody(BaseModel):
    """`POST /decode`: latents [n, *latent_shape] (or VQ code indices [n, *code_shape]) → images."""

    model_config = _REQUEST_CONFIG

    model: str = ModelName
    latents: list[Any] | None = Field(
        None,
        min_length=1,
        max_length=MAX_IMAGES,
        description="nested lists of numbers, [n, *latent_shape] of the model (`GET /models`), "
        "e.g. the `latents` of an encode job; for a VQ-VAE also [n, *code_shape] code indices",
    )
    codes: list[Any] | None = Field(
        None,
        min_length=1,
        max_length=MAX_IMAGES,
        description="VQ-VAE: [n, *code_shape] code indices (integers < codebook_size)",
    )
    output: OutputOptions = Field(default_factory=OutputOptions)


class NoiseOptions(BaseModel):
    model_config = _REQUEST_CONFIG

    kind: Literal["gaussian", "masking", "salt_pepper"] = Field(
        description="gaussian: x + σ·ε; masking: a fraction of pixels set to 0; salt_pepper: a "
        "fraction set to min or max"
    )
    amount: float = Field(
        ge=0.0, le=2.0, description="σ for gaussian (≤ 2); the pixel fraction (≤ 1) otherwise"
    )


class ReconstructBody(BaseModel):
    """`POST /reconstruct`: images (optionally corrupted first) → encoder → decoder → images."""

    model_config = _REQUEST_CONFIG

    model: str = ModelName
    images: list[str] = Field(min_length=1, max_length=MAX_IMAGES, description="base64 PNGs")
    noise: NoiseOptions | None = Field(None, description="corrupt the inputs first (denoising)")
    seed: int | None = Seed
    output: OutputOptions = Field(default_factory=OutputOptions)


# --- answers ---


class Progress(BaseModel):
    step: int
    total: int
    fraction: float = Field(ge=0.0, le=1.0)


class ImageOut(BaseModel):
    url: str | None = Field(None, description="signed, expiring link to the PNG")
    b64: str | None = Field(None, description="inline base64 PNG (output.return = b64)")
    width: int
    height: int
    seed: int | None = None


class JobOutputOut(BaseModel):
    images: list[ImageOut] = Field(default_factory=list)
    latents: list[Any] | None = None
    codes: list[Any] | None = None
    trajectory_url: str | None = None
    corrupted: list[ImageOut] | None = None


class JobMetrics(BaseModel):
    queue_time_s: float | None = Field(None, description="enqueued → started")
    run_time_s: float | None = Field(None, description="started → completed")
    batch_size: int | None = Field(None, description="largest network batch the job ran in")


class JobError(BaseModel):
    type: str
    code: str
    message: str


class Job(BaseModel):
    """A job: one model call, queued, run by a worker, its output kept for `result_ttl_s`."""

    id: str
    kind: JobKind
    model: str
    status: JobStatus
    created_at: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    queue_position: int | None = Field(
        None,
        description="jobs ahead of this one in its model's queue (0 = next); null unless queued",
    )
    progress: Progress | None = None
    input: dict[str, Any] = Field(description="the normalized request (defaults filled in)")
    output: JobOutputOut | None = None
    error: JobError | None = None
    metrics: JobMetrics = Field(default_factory=JobMetrics)


class ModelInfo(BaseModel):
    """One model of `GET /models` (its catalog entry without architecture and files)."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    name: str
    kind: str
    tasks: list[str]
    dataset: str
    description: str = ""
    image: ImageSpec
    latent_shape: list[int] | None = None
    code_shape: list[int] | None = None
    codebook_size: int | None = None
    conditioning: Conditioning | None = None
    schedule: ScheduleSpec | None = None
    samplers: list[str] = Field(default_factory=list)
    defaults: SamplingDefaults | None = None
    classifier: str | None = None
    first_stage: str | None = None
    workers: int | None = Field(
        None, description="live workers serving this model now; null = Redis did not answer"
    )
    available: bool | None = Field(
        None,
        description="a live worker serves this model (jobs are accepted either way and wait in "
        "its queue); null = Redis did not answer",
    )


class ModelList(BaseModel):
    models: list[ModelInfo]


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    ready: bool = Field(description="the gateway accepts jobs: Redis answers")
    redis: bool = Field(description="Redis answers")
    workers: dict[str, int] = Field(
        default_factory=dict, description="live workers listening per model"
    )
    missing: list[str] = Field(default_factory=list, description="models with no live worker")
