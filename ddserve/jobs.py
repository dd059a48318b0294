"""The contract between the gateway and the workers: how a request travels through Redis as an RQ job.

Both sides import this module (it needs neither torch nor FastAPI):
- one RQ queue per model, named `queue_name(prefix, model)`;
- the job calls `JOB_FUNCTION` with one keyword argument, `request`: the JSON form of the job's
  spec (`ddserve.spec`: every default applied by the gateway, typed, parsed once by the worker),
  whose `kind` is one of `JobKind`; uploaded images travel as base64 PNG strings;
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
META_WEBHOOK = "webhook"  # {"url", "events"}: where the job's events are POSTed (service.webhooks)


class JobKind(StrEnum):
    GENERATE = "generate"
    ENCODE = "encode"
    DECODE = "decode"
    RECONSTRUCT = "reconstruct"
    INPAINT = "inpaint"
    IMG2IMG = "img2img"


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
