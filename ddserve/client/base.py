"""What the sync and async clients share: configuration, headers and the reading of answers."""

from __future__ import annotations

import base64
from typing import Any

import httpx

from ddserve.client.errors import ApiError, NotFound, error_for
from ddserve.client.types import Image, Job, Model

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 30.0  # per HTTP request; a `Prefer: wait=N` request gets N more
DEFAULT_WAIT_TIMEOUT_S = 300.0  # how long `wait=True` waits for a job by default
DEFAULT_POLL_INTERVAL_S = 0.25
USER_AGENT = "ddserve-client/0.1"


class ClientConfig:
    """Base URL, API key, timeouts and retries of a client (sync or async)."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        max_retries: int = 0,
    ) -> None:
        if max_retries < 0:
            raise ValueError("max_retries must be ≥ 0")
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.max_retries = max_retries

    def headers(self, extra: dict[str, str] | None = None, *, auth: bool = True) -> dict[str, str]:
        """Headers of an API call; the API key only on the gateway's own routes (a signed image link
        is its own credential, and S3 refuses a second one)."""
        headers = {"User-Agent": USER_AGENT}
        if auth and self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if extra:
            headers.update(extra)
        return headers

    def request_timeout(self, prefer_wait_s: int | None = None) -> httpx.Timeout:
        """The HTTP timeout of one request: the read may last as long as the server holds it."""
        read = self.timeout + (prefer_wait_s or 0)
        return httpx.Timeout(self.timeout, read=read)


def read_answer(response: httpx.Response) -> Any:
    """The JSON of a 2xx answer; the contract's exception for an error answer."""
    if response.status_code < 400:
        return response.json()
    raise answer_error(response)


def answer_error(response: httpx.Response) -> ApiError:
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    return error_for(response.status_code, body, response.headers, response.text)


def parse_job(data: Any) -> Job:
    return Job.model_validate(data)


def parse_models(data: Any) -> list[Model]:
    return [Model.model_validate(m) for m in data.get("models", [])]


def job_id_of(job: Job | str) -> str:
    return job if isinstance(job, str) else job.id


def inline_bytes(image: Image | str) -> bytes | None:
    """An inline (b64) image's bytes; None when it must be fetched from its URL."""
    if isinstance(image, Image) and image.b64 is not None:
        return base64.b64decode(image.b64)
    return None


def link_of(image: Image | str) -> str:
    """The URL to fetch an image from: an `Image`'s signed link, or a URL as given."""
    if isinstance(image, str):
        return image
    if image.url is None:
        raise ValueError("this image has neither a url nor inline b64 data")
    return image.url


def find_model(models: list[Model], name: str) -> Model:
    for model in models:
        if model.name == name:
            return model
    served = ", ".join(m.name for m in models) or "none"
    raise NotFound(
        404, f"unknown model {name!r}; served: {served}", code="model_not_found", param="model"
    )
