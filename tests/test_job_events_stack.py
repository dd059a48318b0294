"""`GET /jobs/{id}/events` through the whole stack (`LocalServer`: gateway, batching worker thread,
fakeredis, uvicorn on a loopback port, auth on) with the Python client's `stream()`, sync and async:
the worker's own events in order, previews that decode, a canceled job, a resume from the middle,
and another API key's job (404)."""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import Iterator

import pytest
from PIL import Image

from ddserve.client import AsyncClient, Client, JobEvent, NotFound
from ddserve.embedded import LocalServer
from service.auth import hash_key
from tests.client_support import DIFFUSION, tiny_stack

KEY, OTHER = "sse-" + uuid.uuid4().hex, "sse-other-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    with tiny_stack(
        tmp_path_factory.mktemp("sse"),
        KEY,
        api_keys=f"tester:{hash_key(KEY)},other:{hash_key(OTHER)}",
    ) as stack:
        yield stack


@pytest.fixture
def client(server: LocalServer) -> Iterator[Client]:
    with Client(server.url, api_key=KEY) as c:
        yield c


def check_order(events: list[JobEvent], steps: int) -> None:
    """queued (maybe: the worker may have taken it already), started, progress…, succeeded."""
    kinds = [e.event for e in events]
    if kinds[0] == "queued":
        kinds = kinds[1:]
    assert kinds[0] == "started" and kinds[-1] == "succeeded", kinds
    assert set(kinds[1:-1]) == {"progress"}
    progress = [e.data["step"] for e in events if e.event == "progress"]
    assert progress == sorted(progress) and progress[-1] == steps
    assert all(e.data["of"] == steps for e in events if e.event == "progress")


def test_events_of_a_job_in_order_with_previews(client: Client) -> None:
    job = client.generate(
        DIFFUSION, n=2, class_label=3, seed=7, num_inference_steps=12, preview_every=4, wait=False
    )
    events = list(client.stream(job, preview=True))
    check_order(events, 12)
    finished = events[-1].job
    assert finished is not None and finished.succeeded and len(finished.images) == 2
    with_previews = [e for e in events if e.previews]
    assert [e.data["step"] for e in with_previews] == [4, 8]  # 12 is the end: the images
    for event in with_previews:
        assert set(event.previews) == {0, 1}
        for png in event.previews.values():
            assert Image.open(io.BytesIO(png)).size == (8, 8)
    # every preview came before the final image: the stream ends at the terminal event
    assert events.index(with_previews[-1]) < len(events) - 1


def test_resume_from_the_middle(client: Client) -> None:
    job = client.generate(DIFFUSION, class_label=1, seed=2, num_inference_steps=10, wait=False)
    everything = list(client.stream(job))
    resumable = [e for e in everything if e.id is not None]
    middle = resumable[len(resumable) // 2]
    rest = list(client.stream(job, last_event_id=middle.id))
    assert [e.id for e in rest[:-1]] == [e.id for e in resumable[len(resumable) // 2 + 1 :]]
    assert rest[-1].event == "succeeded"


def test_canceled_job(client: Client) -> None:
    job = client.generate(DIFFUSION, class_label=1, seed=4, num_inference_steps=1000, wait=False)
    events = []
    for event in client.stream(job):
        events.append(event)
        if event.event in ("queued", "started"):
            client.cancel(job)
    assert events[-1].event == "canceled" and events[-1].job.status == "canceled"


def test_another_keys_job_is_404(server: LocalServer, client: Client) -> None:
    job = client.generate(DIFFUSION, class_label=1, seed=5, wait=False)
    with Client(server.url, api_key=OTHER) as other, pytest.raises(NotFound) as error:
        list(other.stream(job))
    assert error.value.code == "job_not_found"
    assert [e.event for e in client.stream(job)][-1] == "succeeded"


def test_async_stream(server: LocalServer) -> None:
    async def main() -> list[JobEvent]:
        async with AsyncClient(server.url, api_key=KEY) as aclient:
            job = await aclient.generate(
                DIFFUSION, class_label=2, seed=3, num_inference_steps=8, wait=False
            )
            return [event async for event in aclient.stream(job)]

    events = asyncio.run(main())
    check_order(events, 8)
    assert all(not e.previews for e in events)
