"""End to end over HTTP against the real Redis at 127.0.0.1:6379: a uvicorn gateway on a loopback
port, the batching worker in a thread, a zoo of tiny random models (a class-conditional DDPM and a
KL-style autoencoder as ONNX graphs served by ONNX Runtime, written directly rather than exported:
the exporter and its graphs' parity are tests/test_onnx.py's, and one export costs 10-20 s here).
Every route that creates a job runs to `succeeded`; the PNGs behind the signed links decode to the
model's size; the same seed gives the same pixels; a running job is canceled. Keys live under their own prefix and are deleted afterwards."""

from __future__ import annotations

import base64
import io
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from PIL import Image
from redis import Redis

from ddserve.settings import Settings
from service.app import create_app
from service.auth import hash_key
from tests.tiny_zoo import write_diffusion_model, write_onnx_autoencoder

pytestmark = pytest.mark.redis

REDIS_URL = "redis://127.0.0.1:6379/0"
API_KEY = "e2e-key-" + uuid.uuid4().hex
MODEL, CODEC = "tiny-ddpm", "tiny-kl"


def delete_keys(connection: Redis, prefix: str, job_ids: set[str], worker_names: list[str]) -> None:
    patterns = [f"*{prefix}*"]
    for job_id in job_ids:
        patterns += [f"rq:job:{job_id}*", f"rq:results:{job_id}*", f"rq:execution*{job_id}*"]
    for name in worker_names:
        patterns.append(f"rq:worker:{name}*")
        connection.srem("rq:workers", f"rq:worker:{name}")
    for pattern in patterns:
        keys = list(connection.scan_iter(match=pattern, count=1000))
        if keys:
            connection.delete(*keys)


class Gateway:
    """The running stack: an HTTP client, the ids of the jobs created (for cleanup)."""

    def __init__(self, base_url: str) -> None:
        self.http = httpx.Client(
            base_url=base_url, timeout=60, headers={"Authorization": f"Bearer {API_KEY}"}
        )
        self.job_ids: set[str] = set()

    def run(self, route: str, body: dict[str, Any], wait: int = 60) -> dict[str, Any]:
        """POST with Prefer: wait, then poll until the job is terminal."""
        r = self.http.post(route, json=body, headers={"Prefer": f"wait={wait}"})
        assert r.status_code in (200, 202), r.text
        job = r.json()
        self.job_ids.add(job["id"])
        deadline = time.monotonic() + 60
        while job["status"] in ("queued", "running") and time.monotonic() < deadline:
            time.sleep(0.05)
            job = self.http.get(f"/jobs/{job['id']}").json()
        return job

    def submit(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        r = self.http.post(route, json=body)
        assert r.status_code == 202, r.text
        self.job_ids.add(r.json()["id"])
        return r.json()

    def pixels(self, image: dict[str, Any]) -> np.ndarray:
        """The PNG behind a signed link (fetched without the API key: the link is the credential)."""
        r = httpx.get(image["url"], timeout=30)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        picture = Image.open(io.BytesIO(r.content))
        assert picture.format == "PNG" and picture.size == (image["width"], image["height"])
        return np.asarray(picture)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    from workers.embedded import start_worker_thread

    torch.set_num_threads(1)
    connection = Redis.from_url(REDIS_URL)
    try:
        connection.ping()
    except Exception as exc:
        pytest.fail(f"these tests need Redis at {REDIS_URL} (make redis): {exc}")
    root = tmp_path_factory.mktemp("e2e")
    zoo = root / "zoo"
    write_diffusion_model(zoo, MODEL)
    write_onnx_autoencoder(zoo, CODEC)
    prefix = f"e2e-{uuid.uuid4().hex[:10]}"
    settings = Settings(
        redis_url=REDIS_URL,
        key_prefix=prefix,
        zoo_dir=zoo,
        storage_dir=root / "images",
        auth_enabled=True,
        api_keys=f"e2e:{hash_key(API_KEY)}",
        device="cpu",
        onnx_providers="CPUExecutionProvider",
        progress_every=1,
        log_level="WARNING",
    )
    handle = start_worker_thread(settings, Redis.from_url(REDIS_URL), name=f"{prefix}-worker")
    assert handle.ready.wait(120) and handle.error is None, handle.error
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings, Redis.from_url(REDIS_URL)),
            host="127.0.0.1",
            port=0,
            log_config=None,
            access_log=False,
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    stack = Gateway(f"http://127.0.0.1:{port}")
    try:
        yield stack
    finally:
        server.should_exit = True
        thread.join(10)
        handle.stop(30)
        delete_keys(connection, prefix, stack.job_ids, [f"{prefix}-worker"])


@pytest.mark.parametrize(
    "options",
    [
        {"sampler": "ddpm", "num_inference_steps": 4},
        {"sampler": "ddpm", "num_inference_steps": 4, "class_label": 3, "guidance_scale": 3.0},
        {"sampler": "ddim", "num_inference_steps": 4, "eta": 0.5},
        {"sampler": "ddim", "num_inference_steps": 4, "class_label": 7, "guidance_scale": 4.0},
    ],
    ids=["ddpm", "ddpm-guided", "ddim-eta", "ddim-guided"],
)
def test_generate(gateway: Gateway, options: dict[str, Any]) -> None:
    job = gateway.run("/generate", {"model": MODEL, "n": 2, "seed": 11, **options})
    assert job["status"] == "succeeded", job
    assert job["input"]["sampler"] == options["sampler"]
    images = job["output"]["images"]
    assert len(images) == 2 and [im["seed"] for im in images] == [11, 12]  # image i: seed + i
    first, second = (gateway.pixels(im) for im in images)
    assert first.shape == (8, 8) and not np.array_equal(
        first, second
    )  # streams (seed, 0), (seed, 1)
    assert job["progress"]["step"] == job["progress"]["total"] >= 4
    assert job["metrics"]["batch_size"] >= 2 and job["metrics"]["run_time_s"] is not None
    assert job["started_at"] and job["completed_at"] and job["error"] is None


def test_same_seed_same_pixels(gateway: Gateway) -> None:
    body = {"model": MODEL, "n": 2, "seed": 5, "class_label": 1, "num_inference_steps": 5}
    with ThreadPoolExecutor(3) as pool:  # concurrent, so they may share network batches
        jobs = list(
            pool.map(lambda b: gateway.run("/generate", b), [body, body, {**body, "seed": 6}])
        )
    assert all(j["status"] == "succeeded" for j in jobs)
    a, b, other = ([gateway.pixels(im) for im in j["output"]["images"]] for j in jobs)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y)
    assert not np.array_equal(a[0], other[0])
    inline = gateway.run("/generate", {**body, "output": {"return": "b64"}})
    decoded = Image.open(io.BytesIO(base64.b64decode(inline["output"]["images"][0]["b64"])))
    assert np.array_equal(np.asarray(decoded), a[0])


def test_inpaint(gateway: Gateway) -> None:
    image = Image.new("L", (8, 8), 200)
    mask = Image.new("L", (8, 8), 255)
    mask.paste(0, (2, 2, 6, 6))  # generate the centre, keep the border
    encoded = []
    for picture in (image, mask):
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        encoded.append(base64.b64encode(buffer.getvalue()).decode())
    body = {
        "model": MODEL,
        "image": encoded[0],
        "mask": encoded[1],
        "n": 2,
        "seed": 3,
        "num_inference_steps": 4,
        "jump_length": 2,
        "jump_n_sample": 2,
    }
    job = gateway.run("/inpaint", body)
    assert job["status"] == "succeeded", job
    assert [gateway.pixels(im).shape for im in job["output"]["images"]] == [(8, 8), (8, 8)]


def test_img2img(gateway: Gateway) -> None:
    image = Image.new("L", (8, 8), 30)
    image.paste(220, (3, 1, 5, 7))  # a bar
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    body = {
        "model": MODEL,
        "image": base64.b64encode(buffer.getvalue()).decode(),
        "strength": 0.6,
        "n": 2,
        "seed": 8,
        "num_inference_steps": 5,
        "class_label": 1,
    }
    job = gateway.run("/img2img", body)
    assert job["status"] == "succeeded", job
    assert job["kind"] == "img2img" and job["input"]["strength"] == 0.6
    first = [gateway.pixels(im) for im in job["output"]["images"]]
    assert [im.shape for im in first] == [(8, 8), (8, 8)]
    again = gateway.run("/img2img", {**body, "n": 1})
    assert np.array_equal(gateway.pixels(again["output"]["images"][0]), first[0])


def test_encode_decode_reconstruct(gateway: Gateway) -> None:
    rng = np.random.default_rng(0)
    uploads = []
    for _ in range(2):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(buffer, format="PNG")
        uploads.append(base64.b64encode(buffer.getvalue()).decode())
    encoded = gateway.run("/encode", {"model": CODEC, "images": uploads})
    assert encoded["status"] == "succeeded", encoded
    latents = encoded["output"]["latents"]
    assert np.asarray(latents).shape == (2, 2, 4, 4)
    decoded = gateway.run("/decode", {"model": CODEC, "latents": latents})
    assert decoded["status"] == "succeeded", decoded
    assert [gateway.pixels(im).shape for im in decoded["output"]["images"]] == [(8, 8)] * 2
    rebuilt = gateway.run(
        "/reconstruct",
        {"model": CODEC, "images": uploads, "noise": {"kind": "masking", "amount": 0.5}, "seed": 2},
    )
    assert rebuilt["status"] == "succeeded", rebuilt
    assert len(rebuilt["output"]["images"]) == 2 and len(rebuilt["output"]["corrupted"]) == 2
    corrupted = gateway.pixels(rebuilt["output"]["corrupted"][0])
    assert (corrupted == 0).mean() >= 0.45  # half the pixels masked to 0 intensity
    same = gateway.run("/reconstruct", {"model": CODEC, "images": uploads})
    assert np.array_equal(
        gateway.pixels(same["output"]["images"][0]),
        gateway.pixels(decoded["output"]["images"][0]),
    )  # encode → decode equals reconstruct


def test_trajectory_gif(gateway: Gateway) -> None:
    job = gateway.run(
        "/generate",
        {
            "model": MODEL,
            "n": 2,
            "seed": 1,
            "num_inference_steps": 4,
            "output": {"trajectory": True},
        },
    )
    assert job["status"] == "succeeded", job
    r = httpx.get(job["output"]["trajectory_url"], timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "image/gif"
    assert Image.open(io.BytesIO(r.content)).n_frames >= 2


def test_cancel_while_running(gateway: Gateway) -> None:
    job = gateway.submit(
        "/generate",
        {"model": MODEL, "n": 1, "seed": 2, "sampler": "ddpm", "num_inference_steps": 1000},
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        view = gateway.http.get(f"/jobs/{job['id']}").json()
        if view["status"] == "running" and (view["progress"] or {}).get("step", 0) > 0:
            break
        time.sleep(0.02)
    assert view["status"] == "running", view
    canceled = gateway.http.post(f"/jobs/{job['id']}/cancel")
    assert canceled.status_code == 200
    assert canceled.json()["status"] == "canceled", canceled.json()
    final = gateway.http.get(f"/jobs/{job['id']}").json()
    assert final["status"] == "canceled" and final["output"] is None
    assert final["progress"]["step"] < 1000
    after = gateway.run("/generate", {"model": MODEL, "seed": 1, "num_inference_steps": 3})
    assert after["status"] == "succeeded"  # the worker goes on


def test_health_and_metrics(gateway: Gateway) -> None:
    ready = gateway.http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["workers"] == {MODEL: 1, CODEC: 1}
    gateway.run("/generate", {"model": MODEL, "n": 3, "seed": 9, "num_inference_steps": 3})
    text = gateway.http.get("/metrics").text
    assert f'ddserve_workers_alive{{model="{MODEL}"}} 1.0' in text
    images = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(f'ddserve_images_generated_total{{model="{MODEL}"}}')
    ]
    assert images and images[0] >= 3
    assert f'ddserve_compute_duration_seconds_count{{model="{MODEL}"}}' in text
