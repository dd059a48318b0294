"""A private `redis-server` process for fault tests and the chaos benchmark: a free loopback port,
AOF persistence in its own folder (as the compose file runs Redis), and kill / restart on demand.
Nothing is shared with the machine's Redis at 127.0.0.1:6379."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from redis import Redis

from ddserve.settings import Settings
from tests.tiny_zoo import write_diffusion_model


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def redis_server_available() -> bool:
    return shutil.which("redis-server") is not None


class RedisServer:
    """`redis-server --appendonly yes` on `port`, its files under `folder`."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 20.0) -> None:
        """Start the server (loading its AOF, if any) and wait until it answers PING."""
        command = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.folder),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
            "--protected-mode",
            "no",
        ]
        log = (self.folder / "redis.log").open("ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        probe = Redis.from_url(self.url, socket_connect_timeout=0.5, socket_timeout=0.5)
        while True:
            try:
                if probe.ping():
                    break
            except Exception:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.05)
        probe.close()

    def kill(self, signum: int = signal.SIGKILL) -> None:
        """Stop the server abruptly (SIGKILL, a crash) or cleanly (SIGTERM); wait for the exit."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)
            self.process.wait(timeout=20)
        self.process = None

    def restart(self, down_s: float = 0.0) -> None:
        """Crash the server, stay down `down_s` seconds, start it again on the same port and AOF."""
        self.kill()
        time.sleep(down_s)
        self.start()

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


def tiny_ddpm_settings(
    server: RedisServer, root: Path, key_prefix: str, **overrides: Any
) -> Settings:
    """Settings of a gateway and worker threads on `server` serving the tiny DDPM ("tiny-ddpm",
    written under `root/zoo`) on CPU, with a fast heartbeat (0.5 s) and progress every step, so that
    an outage meets running jobs; `overrides` sets anything else."""
    zoo = root / "zoo"
    write_diffusion_model(zoo, "tiny-ddpm")
    fields: dict[str, Any] = {
        "redis_url": server.url,
        "key_prefix": key_prefix,
        "zoo_dir": zoo,
        "storage_dir": root / "images",
        "signing_secret": f"{key_prefix}-secret",
        "device": "cpu",
        "progress_every": 1,
        "heartbeat_s": 0.5,
        "log_level": "WARNING",
    }
    return Settings(**{**fields, **overrides})
