"""The Python client of ddserve's HTTP API: `Client` (sync) and `AsyncClient` (asyncio), typed
answers (`Job`, `Image`, `Model`) and one exception per error of the contract.

Torch-free: it needs httpx, pydantic and (for image uploads from arrays or files) Pillow.
"""

from ddserve.client.aio import AsyncClient
from ddserve.client.errors import (
    ApiError,
    BadRequest,
    ConnectionFailed,
    DdserveError,
    JobCanceled,
    JobFailed,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ServerError,
    Unauthorized,
    Unavailable,
    ValidationError,
    WaitTimeout,
)
from ddserve.client.sync import Client
from ddserve.client.types import Image, Job, JobEvent, JobOutput, Model, Progress, Readiness
from ddserve.jobs import JobStatus

__all__ = [
    "ApiError",
    "AsyncClient",
    "BadRequest",
    "Client",
    "ConnectionFailed",
    "DdserveError",
    "Image",
    "Job",
    "JobCanceled",
    "JobEvent",
    "JobFailed",
    "JobOutput",
    "JobStatus",
    "Model",
    "NotFound",
    "PayloadTooLarge",
    "Progress",
    "RateLimited",
    "Readiness",
    "ServerError",
    "Unauthorized",
    "Unavailable",
    "ValidationError",
    "WaitTimeout",
]
