"""The client's I/O-free core (`ddserve.client.operations`), driven by hand: each test plays the
transport, answering the effects an operation yields, and checks the effects and the result."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from ddserve.client import operations
from ddserve.client.base import ClientConfig
from ddserve.client.errors import ConnectionFailed, JobFailed, RateLimited
from ddserve.client.operations import Done, Report, Send, Sleep, Waiting, resume

CONFIG = ClientConfig("http://ddserve.test/", api_key="k", timeout=5.0, max_retries=1)


def job_json(status: str) -> dict[str, Any]:
    return {"id": "j1", "kind": "generate", "model": "m", "status": status, "input": {}}


def answer(status: int, body: Any, **headers: str) -> httpx.Response:
    return httpx.Response(status, json=body, headers=headers)


def play(
    operation: operations.Operation[Any], replies: list[Any], effects: list[Any] | None = None
) -> tuple[list[Any], Any]:
    """Run `operation`, answering each effect with the next of `replies` (None for a Sleep or a
    Report, whose callback is called); the effects it asked for (into `effects`) and its result."""
    effects = [] if effects is None else effects
    reply: Any = None
    while not isinstance(effect := resume(operation, reply), Done):
        effects.append(effect)
        if isinstance(effect, Report):
            effect.callback(effect.job)
        reply = replies.pop(0) if isinstance(effect, Send) else None
    assert replies == [], "the operation ended before using every reply"
    return effects, effect.value


def test_request_retries_a_429_after_its_retry_after_then_gives_the_json() -> None:
    busy = answer(429, {"error": {"code": "queue_full", "message": "full"}}, **{"Retry-After": "2"})
    effects, result = play(operations.request(CONFIG, "GET", "/models"), [busy, answer(200, {})])
    first, sleep, second = effects
    assert isinstance(first, Send) and first.url == "http://ddserve.test/models"
    assert first.headers["Authorization"] == "Bearer k" and first == second
    assert sleep == Sleep(2.0) and result == {}
    with pytest.raises(RateLimited):  # max_retries=1: the second 429 is final
        play(operations.request(CONFIG, "GET", "/models"), [busy, busy])


def test_a_transport_error_becomes_connection_failed() -> None:
    refused = httpx.ConnectError("refused")
    with pytest.raises(ConnectionFailed, match=r"GET http://ddserve\.test/models: ConnectError"):
        play(operations.models(CONFIG), [refused])
    assert play(operations.health(CONFIG), [refused])[1] is False


def test_submit_holds_with_prefer_wait_then_polls_until_terminal() -> None:
    waiting = Waiting(wait=True, timeout=10.0, poll_interval=0.5, idempotency_key="abc")
    effects, job = play(
        operations.submit(CONFIG, "/generate", {"model": "m"}, waiting),
        [answer(202, job_json("running")), answer(200, job_json("succeeded"))],
    )
    post, sleep, poll = effects
    assert post.method == "POST" and post.json == {"model": "m"}
    assert post.headers["Prefer"] == "wait=10" and post.headers["Idempotency-Key"] == "abc"
    assert post.timeout.read == 15.0  # the request may be held as long as Prefer asks
    assert isinstance(sleep, Sleep) and 0 < sleep.seconds <= 0.5
    assert poll.method == "GET" and poll.url.endswith("/jobs/j1") and job.succeeded


def test_submit_with_progress_reports_every_state_and_raises_for_a_failed_job() -> None:
    seen: list[str] = []
    waiting = Waiting(True, None, 0.1, on_progress=lambda job: seen.append(job.status))
    operation = operations.submit(CONFIG, "/generate", {}, waiting)
    replies = [answer(202, job_json("queued")), answer(200, job_json("failed"))]
    effects: list[Any] = []
    with pytest.raises(JobFailed):
        play(operation, replies, effects)
    assert "Prefer" not in effects[0].headers  # with a callback: poll from the start
    assert [type(e) for e in effects] == [Send, Report, Sleep, Send, Report]
    assert seen == ["queued", "failed"]


def test_wait_false_returns_the_queued_job_without_polling() -> None:
    waiting = Waiting(wait=False, timeout=10.0, poll_interval=0.5)
    effects, job = play(
        operations.submit(CONFIG, "/encode", {}, waiting), [answer(202, job_json("queued"))]
    )
    assert len(effects) == 1 and "Prefer" not in effects[0].headers and job.status == "queued"
