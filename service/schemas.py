"""The request and response bodies of the HTTP contract.

The request bodies are in `ddserve.requests` (shared with the Python client, each parameter declared
once in `ddserve.params`); these are the answers. Limits that depend on the
model (num_inference_steps ≤ T, class_label < number of classes, prompt words, image size) are
checked against the catalog (`service.normalize`) and answered with a 422 naming the field.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ddserve.jobs import JobKind, JobStatus
from models.catalog import Conditioning, ImageSpec, SamplingDefaults, ScheduleSpec

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


class JobList(BaseModel):
    """A page of the caller's jobs, newest first."""

    data: list[Job]
    next_cursor: str | None = Field(
        description="pass as `cursor` for the next page; null when there are no more"
    )


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
    size_multiple: int | None = Field(
        None,
        description="the model also takes other sizes: /generate's height and width are "
        "multiples of this (first-stage factor × 2^(UNet down blocks − 1)); for an imported first "
        "stage, the sides of /encode's and /reconstruct's images (its factor f; /decode's latents "
        "of h × w make f·h × f·w images); null: `image`'s size only",
    )
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
