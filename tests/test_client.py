"""The Python client (`ddserve.client`) against the real gateway and a batching worker thread on a
zoo of tiny models (in-process fakeredis, uvicorn on a loopback port, auth on): typed answers, every
job route sync and async, `wait` with progress and timeouts, downloads, and the mapping of every
contract error to its exception (the statuses the live stack cannot easily produce — 429, 503,
5xx — through httpx's MockTransport)."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from ddserve.client import (
    AsyncClient,
    BadRequest,
    Client,
    ConnectionFailed,
    Job,
    JobCanceled,
    Model,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ServerError,
    Unauthorized,
    Unavailable,
    ValidationError,
    WaitTimeout,
)
from ddserve.embedded import LocalServer
from tests.client_support import CODEC, DIFFUSION, tiny_stack

API_KEY = "client-" + uuid.uuid4().hex
MAX_IMAGE_BYTES = 4096


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    with tiny_stack(
        tmp_path_factory.mktemp("client"), API_KEY, max_image_bytes=MAX_IMAGE_BYTES
    ) as stack:
        yield stack


@pytest.fixture
def client(server: LocalServer) -> Iterator[Client]:
    with Client(server.url, api_key=API_KEY) as c:
        yield c


def pixels(data: bytes) -> np.ndarray:
    picture = Image.open(io.BytesIO(data))
    assert picture.format == "PNG"
    return np.asarray(picture)


def test_models_are_typed(client: Client) -> None:
    models = {m.name: m for m in client.models()}
    assert set(models) == {DIFFUSION, CODEC}
    ddpm = models[DIFFUSION]
    assert isinstance(ddpm, Model) and ddpm.tasks == ["generate", "inpaint"]
    assert ddpm.classes == [str(i) for i in range(10)] and ddpm.schedule is not None
    assert ddpm.defaults is not None and ddpm.defaults.num_inference_steps == 10
    assert models[CODEC].latent_shape == [2, 4, 4] and models[CODEC].classes == []
    assert client.model(CODEC).name == CODEC
    with pytest.raises(NotFound):
        client.model("no-such-model")
    assert client.health() and client.ready().ready


def test_generate_waits_and_downloads(client: Client) -> None:
    job = client.generate(DIFFUSION, n=2, num_inference_steps=4, class_label=3, seed=5)
    assert isinstance(job, Job) and job.succeeded and job.done
    assert job.input["seed"] == 5 and job.input["class_label"] == 3
    assert [(im.width, im.height, im.seed) for im in job.images] == [
        (8, 8, 5),
        (8, 8, 6),
    ]  # image i: seed + i
    first, second = (pixels(data) for data in client.download_images(job))
    assert first.shape == (8, 8) and not np.array_equal(first, second)  # streams (5, 0), (5, 1)
    again = client.generate(
        DIFFUSION, n=1, num_inference_steps=4, class_label=3, seed=5, return_="b64"
    )
    assert again.images[0].b64 is not None
    assert np.array_equal(pixels(client.download(again.images[0])), first)  # same seed, same pixels


def test_progress_callback_sees_every_state(client: Client) -> None:
    seen: list[Job] = []
    job = client.generate(
        DIFFUSION, n=1, num_inference_steps=6, seed=1, trajectory=True, on_progress=seen.append
    )
    assert seen[0].status in ("queued", "running", "succeeded") and seen[-1].id == job.id
    assert seen[-1].succeeded
    steps = [j.progress.step for j in seen if j.progress is not None]
    assert steps and steps == sorted(steps) and steps[-1] == 6
    gif = client.download(job.output.trajectory_url)  # type: ignore[union-attr, arg-type]
    assert Image.open(io.BytesIO(gif)).n_frames >= 2


def test_codec_routes_and_inpaint(client: Client) -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (8, 8), dtype=np.uint8) for _ in range(2)]
    encoded = client.encode(CODEC, images)
    latents = np.asarray(encoded.output.latents)  # type: ignore[union-attr]
    assert latents.shape == (2, 2, 4, 4)
    decoded = client.decode(CODEC, latents=latents)
    rebuilt = client.reconstruct(CODEC, images)
    assert np.array_equal(
        pixels(client.download(decoded.images[0])), pixels(client.download(rebuilt.images[0]))
    )  # encode → decode equals reconstruct
    noisy = client.reconstruct(CODEC, images, noise="masking", amount=0.5, seed=2)
    corrupted = pixels(client.download(noisy.output.corrupted[0]))  # type: ignore[union-attr, index]
    assert (corrupted == 0).mean() >= 0.4
    keep = np.ones((8, 8), dtype=bool)
    keep[2:6, 2:6] = False  # generate the centre
    painted = client.inpaint(
        DIFFUSION, Image.fromarray(images[0]), keep, n=2, num_inference_steps=4, seed=3
    )
    assert painted.succeeded and len(painted.images) == 2
    assert painted.input["jump_length"] == 4  # the default jump cut to the step count


def test_async_client(server: LocalServer) -> None:
    async def scenario() -> tuple[list[Job], list[bytes], Job]:
        async with AsyncClient(server.url, api_key=API_KEY) as client:
            assert [m.name for m in await client.models()] == [DIFFUSION, CODEC]
            jobs = await asyncio.gather(
                *(client.generate(DIFFUSION, num_inference_steps=3, seed=s) for s in range(3))
            )
            pngs = await client.download_images(jobs[0])
            queued = await client.generate(DIFFUSION, num_inference_steps=3, seed=9, wait=False)
            states: list[str] = []

            async def note(job: Job) -> None:
                states.append(job.status)

            finished = await client.wait(queued.id, timeout=60, on_progress=note)
            assert states[-1] == "succeeded"
            with pytest.raises(NotFound):
                await client.get_job("no-such-job")
            return list(jobs), pngs, finished

    jobs, pngs, finished = asyncio.run(scenario())
    assert all(j.succeeded for j in jobs) and len({j.id for j in jobs}) == 3
    assert pixels(pngs[0]).shape == (8, 8) and finished.succeeded


def test_wait_timeout_then_cancel(client: Client) -> None:
    job = client.generate(DIFFUSION, sampler="ddpm", num_inference_steps=1000, seed=2, wait=False)
    assert job.status == "queued" and not job.done
    with pytest.raises(WaitTimeout) as timeout:
        client.wait(job, timeout=0.5, poll_interval=0.05)
    assert timeout.value.job.id == job.id and not timeout.value.job.done
    assert isinstance(timeout.value, TimeoutError)
    canceled = client.cancel(job)
    assert canceled.status == "canceled"
    with pytest.raises(JobCanceled) as raised:
        client.wait(job.id, timeout=10)
    assert raised.value.job.status == "canceled"
    assert client.wait(job.id, timeout=10, raise_on_failure=False).status == "canceled"


def test_contract_errors_from_the_live_gateway(server: LocalServer, client: Client) -> None:
    with Client(server.url, api_key="wrong") as intruder, pytest.raises(Unauthorized) as e401:
        intruder.models()
    assert e401.value.status_code == 401 and e401.value.code == "invalid_api_key"
    with Client(server.url) as anonymous, pytest.raises(Unauthorized):
        anonymous.generate(DIFFUSION)
    with pytest.raises(ValidationError) as e422:
        client.generate(DIFFUSION, class_label=99)
    assert e422.value.param == "class_label" and e422.value.status_code == 422
    assert isinstance(e422.value, BadRequest) and "out of range" in e422.value.message
    with pytest.raises(NotFound) as e404:
        client.generate("no-such-model")
    assert e404.value.param == "model" and e404.value.request_id
    with pytest.raises(BadRequest) as e400:
        client.encode(DIFFUSION, [np.zeros((8, 8), np.uint8)])
    assert e400.value.status_code == 400 and e400.value.code == "unsupported_task"
    noise = np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8)
    with pytest.raises(PayloadTooLarge) as e413:
        client.encode(CODEC, [noise])  # a random 64×64 PNG is > 4 kB
    assert e413.value.status_code == 413 and e413.value.param == "images[0]"
    with pytest.raises(NotFound):
        client.cancel("no-such-job")


def mock_client(handler: httpx.MockTransport, **options: object) -> Client:
    return Client("http://ddserve.test", http=httpx.Client(transport=handler), **options)  # type: ignore[arg-type]


def error_body(code: str, message: str, param: str | None = None) -> dict[str, object]:
    return {"error": {"type": "x", "code": code, "message": message, "param": param}}


def test_rate_limit_unavailable_and_server_errors_map_to_exceptions() -> None:
    answers = {
        "/models": httpx.Response(
            429, json=error_body("rate_limited", "slow down"), headers={"Retry-After": "7"}
        ),
        "/jobs/a": httpx.Response(
            503, json=error_body("redis_unavailable", "down"), headers={"Retry-After": "5"}
        ),
        "/jobs/b": httpx.Response(500, text="<html>boom</html>"),
        "/jobs/c": httpx.Response(502, text="bad gateway"),
    }
    client = mock_client(httpx.MockTransport(lambda request: answers[request.url.path]))
    with pytest.raises(RateLimited) as e429:
        client.models()
    assert e429.value.retry_after == 7.0 and e429.value.code == "rate_limited"
    with pytest.raises(Unavailable) as e503:
        client.get_job("a")
    assert e503.value.retry_after == 5.0
    with pytest.raises(ServerError) as e500:
        client.get_job("b")
    assert "boom" in e500.value.message and e500.value.status_code == 500
    with pytest.raises(ServerError):
        client.get_job("c")


def test_retries_follow_retry_after_and_prefer_wait_is_sent() -> None:
    calls: list[httpx.Request] = []
    done = {
        "id": "j1",
        "kind": "generate",
        "model": "m",
        "status": "succeeded",
        "input": {},
        "output": {"images": []},
    }

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) <= 2:
            return httpx.Response(
                429, json=error_body("queue_full", "full"), headers={"Retry-After": "0"}
            )
        return httpx.Response(200, json=done)

    client = mock_client(httpx.MockTransport(handler), max_retries=2, api_key="k")
    job = client.generate("m", n=2, seed=1, timeout=30)
    assert job.succeeded and len(calls) == 3
    sent = calls[-1]
    assert sent.headers["Prefer"] == "wait=30" and sent.headers["Authorization"] == "Bearer k"
    assert json.loads(sent.content) == {
        "model": "m",
        "n": 2,
        "seed": 1,
        "output": {"format": "png", "return": "url"},
    }
    calls.clear()
    with pytest.raises(RateLimited):  # retries exhausted
        mock_client(httpx.MockTransport(handler), max_retries=1).generate("m")
    assert len(calls) == 2

    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(202, json={**done, "status": "queued"} if len(seen) == 1 else done)

    queued = mock_client(httpx.MockTransport(answer)).generate("m", wait=False)
    assert queued.status == "queued" and "Prefer" not in seen[0].headers
    assert "Authorization" not in seen[0].headers  # no key configured, none sent
    seen.clear()
    states: list[str] = []
    mock_client(httpx.MockTransport(answer)).generate(
        "m", poll_interval=0.01, on_progress=lambda j: states.append(j.status)
    )
    assert "Prefer" not in seen[0].headers  # with a progress callback: poll from the start
    assert states == ["queued", "succeeded"] and seen[1].url.path == "/jobs/j1"


def test_unreachable_server_raises_connection_failed() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    with Client(f"http://127.0.0.1:{port}", timeout=2) as client:
        assert client.health() is False
        with pytest.raises(ConnectionFailed):
            client.models()


def test_upload_forms(tmp_path: Path) -> None:
    from ddserve.client.bodies import encode_image, png_bytes

    array = np.arange(64, dtype=np.uint8).reshape(8, 8)
    png = png_bytes(array)
    path = tmp_path / "a.png"
    path.write_bytes(png)
    jpeg = io.BytesIO()
    Image.fromarray(array).save(jpeg, format="JPEG")
    assert png_bytes(path) == png and png_bytes(str(path)) == png
    assert np.array_equal(pixels(png_bytes(Image.fromarray(array))), array)
    assert pixels(png_bytes(jpeg.getvalue())).shape == (8, 8)  # converted to PNG
    assert set(np.unique(pixels(png_bytes(array > 10)))) == {0, 255}  # bool mask: True = keep
    assert encode_image(png).startswith("iVBOR")
    with pytest.raises(TypeError):
        png_bytes(np.zeros((8, 8), dtype=np.float32))
    with pytest.raises(TypeError):
        png_bytes(3.5)


@pytest.mark.filterwarnings("ignore:You should not use the .timeout. argument")
def test_decode_takes_vector_latents(tmp_path: Path) -> None:
    """The VAE's latent_shape is a vector [D]: /decode takes [n, D] (the playground's interpolation
    strip decodes lerped VAE latents). Gateway only: the job is queued, no worker needed."""
    import fakeredis
    from fastapi.testclient import TestClient

    from ddserve.settings import Settings
    from models.registry import write_entry
    from service.app import create_app

    vae = {
        "name": "vector-vae",
        "kind": "vae",
        "tasks": ["encode", "decode"],
        "dataset": "digits",
        "image": {"channels": 1, "height": 16, "width": 16},
        "latent_shape": [4],
    }
    write_entry(tmp_path / "zoo" / "vector-vae", vae)
    settings = Settings(redis_url=None, zoo_dir=tmp_path / "zoo", auth_enabled=False)
    app = create_app(settings, fakeredis.FakeRedis())
    with TestClient(app) as http, Client("http://testserver", http=http) as client:
        t = np.linspace(0.0, 1.0, 5)[:, None]
        latents = (1 - t) * np.zeros(4) + t * np.ones(4)  # [5, 4]
        job = client.decode("vector-vae", latents=latents, wait=False)
        assert job.status == "queued" and np.asarray(job.input["latents"]).shape == (5, 4)
        with pytest.raises(ValidationError) as wrong:
            client.decode("vector-vae", latents=np.zeros((2, 3)), wait=False)
        assert wrong.value.param == "latents"
