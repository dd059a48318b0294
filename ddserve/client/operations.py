"""The client's logic without its I/O ("sans-I/O"): every API operation is a generator that yields
the effects it needs — `Send` an HTTP request, `Sleep`, `Report` progress — and gets their results
back. `Client` and `AsyncClient` each run these generators with one small driver (`run` with
blocking httpx and `time.sleep`, or with `await`), so request building, answer parsing, retries,
`Prefer: wait` and polling are written once.

A driver's contract: loop on `resume(operation, reply)` until it gives `Done`; for a `Send`, the
reply is the `httpx.Response`, or the `httpx.TransportError` the request raised; a `Sleep` is slept
and a `Report`'s callback called (and, async, awaited), their reply None.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from ddserve.client.base import (
    ClientConfig,
    answer_error,
    find_model,
    inline_bytes,
    job_id_of,
    link_of,
    parse_job,
    parse_models,
    read_answer,
)
from ddserve.client.errors import ApiError, ConnectionFailed, WaitTimeout
from ddserve.client.polling import Deadline, outcome, prefer_wait, retry_delay
from ddserve.client.types import Image, Job, Model, Readiness

T = TypeVar("T")


@dataclass(frozen=True)
class Send:
    """One HTTP request to make; the driver answers with its `httpx.Response`."""

    method: str
    url: str
    headers: dict[str, str]
    timeout: httpx.Timeout
    json: Any = None


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Report:
    """Call `callback(job)` (awaiting it too when it is a coroutine function, in the async client)."""

    callback: Callable[[Job], Any]
    job: Job


Effect = Send | Sleep | Report
Operation = Generator[Effect, Any, T]


@dataclass(frozen=True)
class Done:
    """An operation's result, once it has no more effects to ask for."""

    value: Any


def resume(operation: Operation[Any], reply: Any) -> Effect | Done:
    """Hand `reply` (the result of the last effect; None to start) to the operation and get its next
    effect, or `Done`. A transport error is thrown into it, to be mapped where it was asked for."""
    try:
        if isinstance(reply, httpx.TransportError):
            return operation.throw(reply)
        return operation.send(reply)
    except StopIteration as done:
        return Done(done.value)


@dataclass(frozen=True)
class Waiting:
    """How a job route waits for its job: `wait=False` returns the queued job at once; otherwise
    `Prefer: wait=N` then polling every `poll_interval` s until terminal or `timeout` s."""

    wait: bool
    timeout: float | None
    poll_interval: float
    on_progress: Callable[[Job], Any] | None = None
    idempotency_key: str | None = None


def request(
    config: ClientConfig,
    method: str,
    path: str,
    *,
    json: Any = None,
    headers: dict[str, str] | None = None,
    prefer_wait_s: int | None = None,
) -> Operation[Any]:
    """One API call (retried on 429/503 up to max_retries): its JSON, or the mapped error."""
    url = config.base_url + path
    attempt = 0
    while True:
        try:
            response = yield Send(
                method,
                url,
                config.headers(headers),
                config.request_timeout(prefer_wait_s),
                json,
            )
            return read_answer(response)
        except ApiError as error:
            delay = retry_delay(error, attempt, config.max_retries)
            if delay is None:
                raise
        except httpx.TransportError as error:
            raise ConnectionFailed(f"{method} {url}: {type(error).__name__}: {error}") from error
        yield Sleep(delay)
        attempt += 1


def submit(
    config: ClientConfig, route: str, body: dict[str, Any], waiting: Waiting
) -> Operation[Job]:
    """`POST route` with a job body, then wait for the job as `waiting` says."""
    headers: dict[str, str] = {}
    if waiting.idempotency_key is not None:
        headers["Idempotency-Key"] = waiting.idempotency_key
    deadline = Deadline.after(waiting.timeout)
    held = prefer_wait(deadline) if waiting.wait and waiting.on_progress is None else None
    if held is not None:
        headers["Prefer"] = f"wait={held}"
    answer = yield from request(
        config, "POST", route, json=body, headers=headers, prefer_wait_s=held
    )
    job = parse_job(answer)
    if not waiting.wait:
        return job
    return (yield from wait_until(config, job, deadline, waiting, raise_on_failure=True))


def wait_until(
    config: ClientConfig,
    job: Job,
    deadline: Deadline,
    waiting: Waiting,
    *,
    raise_on_failure: bool,
) -> Operation[Job]:
    """Poll `job` until it is terminal (`outcome`) or the deadline passes (`WaitTimeout`)."""
    while True:
        if waiting.on_progress is not None:
            yield Report(waiting.on_progress, job)
        if job.done:
            return outcome(job, raise_on_failure)
        if deadline.expired():
            raise WaitTimeout(job, waiting.timeout if waiting.timeout is not None else 0.0)
        yield Sleep(deadline.sleep_for(waiting.poll_interval))
        job = yield from get_job(config, job.id)


def wait(
    config: ClientConfig, job: Job | str, waiting: Waiting, *, raise_on_failure: bool
) -> Operation[Job]:
    """`Client.wait`: the job (fetched first when given by id) polled until it is terminal."""
    deadline = Deadline.after(waiting.timeout)
    current = (yield from get_job(config, job)) if isinstance(job, str) else job
    return (
        yield from wait_until(config, current, deadline, waiting, raise_on_failure=raise_on_failure)
    )


def get_job(config: ClientConfig, job: Job | str) -> Operation[Job]:
    return parse_job((yield from request(config, "GET", f"/jobs/{job_id_of(job)}")))


def cancel(config: ClientConfig, job: Job | str) -> Operation[Job]:
    return parse_job((yield from request(config, "POST", f"/jobs/{job_id_of(job)}/cancel")))


def models(config: ClientConfig) -> Operation[list[Model]]:
    return parse_models((yield from request(config, "GET", "/models")))


def model(config: ClientConfig, name: str) -> Operation[Model]:
    return find_model((yield from models(config)), name)


def health(config: ClientConfig) -> Operation[bool]:
    try:
        yield from request(config, "GET", "/healthz")
    except (ApiError, ConnectionFailed):
        return False
    return True


def ready(config: ClientConfig) -> Operation[Readiness]:
    """`GET /readyz`, whose 503 (not ready) is an answer like its 200, never retried."""
    try:
        response = yield Send(
            "GET", config.base_url + "/readyz", config.headers(), config.request_timeout()
        )
    except httpx.TransportError as error:
        raise ConnectionFailed(f"GET /readyz: {error}") from error
    if response.status_code not in (200, 503):
        raise answer_error(response)
    return Readiness.model_validate(response.json())


def download(config: ClientConfig, image: Image | str) -> Operation[bytes]:
    """An image's bytes: inline b64 decoded, or fetched from its signed link without the API key."""
    inline = inline_bytes(image)
    if inline is not None:
        return inline
    link = link_of(image)
    try:
        response = yield Send("GET", link, config.headers(auth=False), config.request_timeout())
    except httpx.TransportError as error:
        raise ConnectionFailed(f"GET {link}: {error}") from error
    if response.status_code >= 400:
        raise answer_error(response)
    return response.content
