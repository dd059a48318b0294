"""The whole stack in this process for client, CLI and playground tests: `LocalServer` (gateway +
batching worker thread on fakeredis + uvicorn on a loopback port) over a zoo of tiny random models —
a class-conditional 8×8 DDPM that generates and inpaints, and an 8×8 KL autoencoder in ONNX — or
over the tiny Stable Diffusion pipeline of `tests/tiny_sd.py`, imported by `ddserve import`."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ddserve.client import Client, Job
from ddserve.embedded import LocalServer
from ddserve.settings import Settings
from service.auth import hash_key
from tests.tiny_zoo import write_diffusion_model, write_onnx_autoencoder

DIFFUSION, CODEC = "tiny-ddpm", "tiny-kl"


def write_zoo(root: Path) -> Path:
    zoo = root / "zoo"
    write_diffusion_model(zoo, DIFFUSION)
    write_onnx_autoencoder(zoo, CODEC)
    return zoo


def tiny_settings(root: Path, api_key: str | None = None, **overrides: Any) -> Settings:
    """Settings of a stack on the tiny zoo under `root`; auth on with `api_key` when given."""
    zoo = root / "zoo" if (root / "zoo").is_dir() else write_zoo(root)
    fields: dict[str, Any] = {
        "redis_url": None,
        "key_prefix": "client-test",
        "zoo_dir": zoo,
        "storage_dir": root / "images",
        "auth_enabled": api_key is not None,
        "api_keys": f"tester:{hash_key(api_key)}" if api_key else "",
        "device": "cpu",
        "onnx_providers": "CPUExecutionProvider",
        "progress_every": 1,
        "log_level": "WARNING",
    }
    fields.update(overrides)
    return Settings(**fields)


def tiny_stack(root: Path, api_key: str | None = None, **overrides: Any) -> LocalServer:
    """The stack on the tiny zoo under `root` (see `tiny_settings`), not started yet: `with
    tiny_stack(root) as server:` starts it and stops it on the way out."""
    torch.set_num_threads(1)
    return LocalServer(tiny_settings(root, api_key, **overrides))


@contextmanager
def tiny_sd_stack(
    root: Path,
    name: str,
    key_prefix: str,
    pipeline_class: str = "StableDiffusionPipeline",
    unet_channels: int = 4,
    **overrides: Any,
) -> Iterator[tuple[LocalServer, Any]]:
    """The tiny `StableDiffusionPipeline` (`tests/tiny_sd.py`; saved as `pipeline_class`, its UNet
    taking `unet_channels`) saved under `root/source`, imported
    as `name` into the model repository `root/models` (no zoo), and the whole stack serving it on
    CPU without auth; yields the started server and the pipeline (the reference to compare with),
    and stops the server on the way out. Needs diffusers and transformers."""
    from models.diffusers_format.importer import import_pipeline
    from tests.tiny_sd import tiny_sd_pipeline

    torch.set_num_threads(1)
    pipe = tiny_sd_pipeline(
        root / "source", pipeline_class=pipeline_class, unet_channels=unet_channels
    )
    settings = Settings(
        redis_url=None,
        key_prefix=key_prefix,
        zoo_dir=root / "no-zoo",
        model_dirs=str(root / "models"),
        storage_dir=root / "images",
        auth_enabled=False,
        device="cpu",
        log_level="WARNING",
        **overrides,
    )
    target, checked = import_pipeline(
        str(root / "source" / "pipeline"), name=name, settings=settings
    )
    assert target == root / "models" / name and checked.entries[0].tasks
    with LocalServer(settings) as server:
        yield server, pipe


def job_images(client: Client, job: Job) -> list[np.ndarray]:
    """A succeeded job's images, downloaded and decoded ([H, W, C] uint8 each)."""
    assert job.succeeded, job.error
    return [np.asarray(Image.open(io.BytesIO(data))) for data in client.download_images(job)]


def same_pixels(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to one level of rounding (float sums vary in the last bit with the batch)."""
    return int(np.abs(a.astype(int) - b.astype(int)).max()) <= 1


def assert_batched_equal_alone(
    client: Client,
    model: str,
    bodies: list[dict[str, Any]],
    base: dict[str, Any],
    blocker: dict[str, Any],
) -> list[np.ndarray]:
    """Batch invariance over HTTP: each `base | body` request is generated alone, then all of them
    again while a long `blocker` job runs, so that they join its running set as they arrive; each
    must have shared its network calls (batch size ≥ 3) and give its solo image (up to rounding).
    Returns the solo images."""
    alone = [job_images(client, client.generate(model, **{**base, **body}))[0] for body in bodies]
    long_job = client.generate(model, wait=False, **blocker)
    jobs = [client.generate(model, wait=False, **{**base, **body}) for body in bodies]
    for body, solo, job in zip(bodies, alone, jobs, strict=True):
        done = client.wait(job)
        assert (done.metrics.batch_size or 0) >= 3, done.metrics  # it shared its network calls
        assert same_pixels(job_images(client, done)[0], solo), body
    assert client.wait(long_job).succeeded
    return alone
