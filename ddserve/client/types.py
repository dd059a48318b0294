"""Typed answers of the gateway: jobs, their outputs and the model catalog (pydantic models).

They mirror the contract's JSON (`/work/shared/api-contract.md`) and accept fields they do not know
(`extra="allow"`), so a newer server does not break an older client.

They repeat `service.schemas` / `models.catalog` on purpose: the client must not import the server
(FastAPI, torch), and its models are open where the server's are strict.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ddserve.jobs import TERMINAL, JobKind, JobStatus

_OPEN = ConfigDict(extra="allow", protected_namespaces=())


class Progress(BaseModel):
    """Denoising steps done of the job's total (RePaint's resampling counts its extra steps)."""

    model_config = _OPEN

    step: int
    total: int
    fraction: float


class Image(BaseModel):
    """One output image: a signed, expiring `url`, or inline `b64` (output.return = "b64")."""

    model_config = _OPEN

    url: str | None = None
    b64: str | None = None
    width: int
    height: int
    seed: int | None = None


class JobOutput(BaseModel):
    """A finished job's output. `latents` ([n, C, H, W]) / `codes` ([n, H, W]) come from /encode;
    `corrupted` from /reconstruct with noise; `trajectory_url` (an animated GIF of x_t) from
    /generate with `trajectory=True`."""

    model_config = _OPEN

    images: list[Image] = Field(default_factory=list)
    latents: list[Any] | None = None
    codes: list[Any] | None = None
    trajectory_url: str | None = None
    corrupted: list[Image] | None = None


class JobErrorInfo(BaseModel):
    """Why a job failed (written by the worker)."""

    model_config = _OPEN

    type: str
    code: str
    message: str


class JobMetrics(BaseModel):
    model_config = _OPEN

    queue_time_s: float | None = None
    run_time_s: float | None = None
    batch_size: int | None = None


class Job(BaseModel):
    """A job: one model call, `queued` → `running` → `succeeded` | `failed` | `canceled`."""

    model_config = _OPEN

    id: str
    kind: JobKind
    model: str
    status: JobStatus
    created_at: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    queue_position: int | None = None
    progress: Progress | None = None
    input: dict[str, Any] = Field(default_factory=dict)
    output: JobOutput | None = None
    error: JobErrorInfo | None = None
    metrics: JobMetrics = Field(default_factory=JobMetrics)

    @property
    def done(self) -> bool:
        """True once the job is terminal (succeeded, failed or canceled)."""
        return self.status in TERMINAL

    @property
    def succeeded(self) -> bool:
        return self.status == JobStatus.SUCCEEDED

    @property
    def images(self) -> list[Image]:
        """The output images (empty until the job succeeded)."""
        return self.output.images if self.output is not None else []


class ImageShape(BaseModel):
    model_config = _OPEN

    channels: int
    height: int
    width: int


class Conditioning(BaseModel):
    """`class`: `class_label` indexes `classes`; `text`: a `prompt` of `vocabulary` words."""

    model_config = _OPEN

    type: str
    classes: list[str] | None = None
    vocabulary: list[str] | None = None
    context_len: int | None = None


class Schedule(BaseModel):
    model_config = _OPEN

    kind: str
    num_timesteps: int


class SamplingDefaults(BaseModel):
    model_config = _OPEN

    sampler: str = "ddim"
    num_inference_steps: int = 50
    eta: float = 0.0
    use_karras_sigmas: bool = False  # euler, euler_ancestral, dpmpp_*, unipc only
    solver_order: int = 2  # dpmpp_2m, dpmpp_2m_sde, unipc only
    guidance_scale: float = 1.0  # diffusers' s; 1 = no guidance
    classifier_scale: float = 0.0
    clip_denoised: bool = True
    jump_length: int = 10
    jump_n_sample: int = 1


class Model(BaseModel):
    """A served model as `GET /models` shows it."""

    model_config = _OPEN

    name: str
    kind: str
    tasks: list[str]
    dataset: str = ""
    description: str = ""
    image: ImageShape
    latent_shape: list[int] | None = None
    size_multiple: int | None = None  # sides of the sizes it takes: multiples of it (None: fixed)
    code_shape: list[int] | None = None
    codebook_size: int | None = None
    conditioning: Conditioning | None = None
    schedule: Schedule | None = None
    samplers: list[str] = Field(default_factory=list)
    defaults: SamplingDefaults | None = None
    classifier: str | None = None
    first_stage: str | None = None

    @property
    def classes(self) -> list[str]:
        """The class names of a class-conditional model (empty otherwise)."""
        cond = self.conditioning
        return list(cond.classes or []) if cond is not None and cond.type == "class" else []


class Readiness(BaseModel):
    """`GET /readyz`: Redis reachable and a live worker for every served model."""

    model_config = _OPEN

    ready: bool
    redis: bool
    workers: dict[str, int] = Field(default_factory=dict)
    missing: list[str] = Field(default_factory=list)


class JobEvent(BaseModel):
    """One Server-Sent Event of `GET /jobs/{id}/events` (`Client.stream`): `event` is queued,
    started, progress, succeeded, failed or canceled; `data` its JSON (`position`; `step`, `of`,
    `previews`; the job, for the terminal three); `id` the event id to resume after (None for
    queued and the terminal events, which are read from the job's record)."""

    model_config = _OPEN

    event: str
    data: dict[str, Any] = Field(default_factory=dict)
    id: str | None = None

    @property
    def terminal(self) -> bool:
        """The last event of the stream: the job succeeded, failed or was canceled."""
        return self.event in {s.value for s in TERMINAL}

    @property
    def job(self) -> Job | None:
        """The job as it ended (terminal events only)."""
        return Job.model_validate(self.data) if self.terminal else None

    @property
    def previews(self) -> dict[int, bytes]:
        """Image index → PNG bytes of its x̂_0 preview (progress events of a stream opened with
        `preview=True`, for a job submitted with `preview_every`)."""
        import base64

        return {
            int(p["index"]): base64.b64decode(p["png"]) for p in self.data.get("previews") or []
        }
