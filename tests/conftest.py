"""Shared fixtures: small seeded networks, the exact noise predictor of Gaussian data, a Redis round-trip
counter, a private corner of the real Redis (`box`), a private redis-server (`redis_server`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from redis.connection import AbstractConnection

from models.diffusion.schedule import NoiseSchedule
from models.nets.unet import UNet, UNetConfig
from tests.diffusers_fixtures import pipelines_dir  # noqa: F401  (a shared session fixture)
from tests.redis_sandbox import RedisSandbox, sandbox
from tests.redis_server import RedisServer, redis_server_available
from tests.tiny_zoo import randomized_unet

# Tests use small tensors: one thread avoids OpenMP spin-waiting when the machine is oversubscribed.
torch.set_num_threads(1)


class GaussianOptimalEps:
    """ε*(x, t) for x_0 ~ N(μ, s²) per element (diffusion-references.md):
    ε* = √(1 − ᾱ_t)(x − √ᾱ_t μ) / (ᾱ_t s² + 1 − ᾱ_t). A perfect 'trained' model without training."""

    def __init__(self, schedule: NoiseSchedule, mu: float, std: float) -> None:
        self.alpha_bar = schedule.alphas_cumprod
        self.mu, self.var = mu, std**2

    def __call__(
        self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        a = self.alpha_bar[t.cpu()].to(x).reshape(-1, *([1] * (x.dim() - 1)))
        return (1 - a).sqrt() * (x - a.sqrt() * self.mu) / (a * self.var + 1 - a)


@pytest.fixture(scope="session")
def linear_schedule() -> NoiseSchedule:
    return NoiseSchedule.create("linear", 1000)


@pytest.fixture(scope="session")
def tiny_class_unet() -> UNet:
    cfg = UNetConfig(
        in_channels=1,
        image_size=8,
        base_channels=8,
        channel_mults=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(4,),
        num_classes=3,
    )
    return randomized_unet(cfg)


@pytest.fixture
def round_trips(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Redis round trips made while the test runs (one `send_packed_command` per command or
    pipeline)."""
    sent = [0]
    original = AbstractConnection.send_packed_command

    def counting(self: AbstractConnection, command: Any, check_health: bool = True) -> None:
        sent[0] += 1
        original(self, command, check_health)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", counting)
    return sent


@pytest.fixture
def box() -> Iterator[RedisSandbox]:
    """The test's own key prefix on the real Redis, every key it created deleted afterwards (skips
    without a Redis server)."""
    with sandbox() as b:
        yield b


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server (AOF on) on its own loopback port, its files under the test's folder,
    killed after the test (skips without the redis-server binary)."""
    if not redis_server_available():
        pytest.skip("needs redis-server")
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.kill()
