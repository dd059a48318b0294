"""What the benchmarks that start a gateway share: this checkout's root, a free loopback port, a zoo
holding a random-weight network of digits-ddpm's architecture, a gateway's environment, waiting
until it answers, a process's CPU time, stopping the processes started, and deleting a run's
Redis keys afterwards."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
MODEL = "digits-ddpm"  # the recipe the benchmarks' networks are built from


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def random_ddpm_zoo(zoo: Path, name: str = MODEL, unet: dict[str, Any] | None = None) -> Path:
    """`zoo/<name>`: digits-ddpm's zoo entry (classes, schedule, samplers, defaults; no classifier)
    on a network of its recipe's U-Net, with `unet`'s fields changed, at random weights (seed 0):
    serving speed does not depend on the weights' values. Returns `zoo`."""
    import torch

    from models.nets.unet import UNet, UNetConfig
    from models.registry import WEIGHTS_FILE, save_weights, write_entry

    recipe = json.loads((ROOT / "models" / "recipes" / f"{MODEL}.json").read_text())
    torch.manual_seed(0)
    net = UNet(UNetConfig.from_dict(recipe["unet"] | (unet or {})))
    folder = zoo / name
    folder.mkdir(parents=True)
    save_weights(net, folder / WEIGHTS_FILE)
    entry = dict(recipe["entry"])
    entry.update(
        name=name,
        dataset=recipe["dataset"],
        schedule=recipe["schedule"],
        network={"unet": net.config.to_dict()},
        files={"weights": WEIGHTS_FILE},
    )
    entry.pop("classifier", None)
    write_entry(folder, entry)
    return zoo


def gateway_env(
    redis_url: str, prefix: str, zoo: Path, models: str, storage_dir: Path, **settings: object
) -> dict[str, str]:
    """This process's environment and the settings of a benchmarked gateway (and its workers): the
    run's Redis and key prefix, the zoo and models served, no auth, no rate limit, warnings only;
    each of `settings` as `DDSERVE_<NAME>` (`max_batch=64` → `DDSERVE_MAX_BATCH=64`)."""
    return {
        **os.environ,
        "DDSERVE_REDIS_URL": redis_url,
        "DDSERVE_KEY_PREFIX": prefix,
        "DDSERVE_ZOO_DIR": str(zoo),
        "DDSERVE_MODELS": models,
        "DDSERVE_STORAGE_DIR": str(storage_dir),
        "DDSERVE_AUTH_ENABLED": "false",
        "DDSERVE_RATE_LIMIT_PER_MINUTE": "0",
        "DDSERVE_LOG_LEVEL": "WARNING",
        **{f"DDSERVE_{name.upper()}": str(value) for name, value in settings.items()},
    }


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_answer(
    url: str, timeout_s: float, every_s: float, failure: str, process: subprocess.Popen | None
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{failure}: the process exited")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(every_s)
    raise RuntimeError(failure)


def wait_healthy(url: str, timeout_s: float = 60, process: subprocess.Popen | None = None) -> None:
    """Until the gateway at `url` answers `/healthz` (RuntimeError after `timeout_s`, or at once
    when its `process` exits)."""
    _wait_answer(f"{url}/healthz", timeout_s, 0.1, "the gateway did not start", process)


def wait_ready(url: str, timeout_s: float = 180) -> None:
    """Until the gateway at `url` answers `/readyz` with 200 (Redis up, a worker serving)."""
    _wait_answer(
        f"{url}/readyz", timeout_s, 0.25, "the gateway and worker did not become ready", None
    )


def stop_all(processes: Iterable[subprocess.Popen], timeout_s: float = 30) -> None:
    """SIGTERM to each, then wait for each (SIGKILL after `timeout_s`)."""
    processes = list(processes)
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()


def cleanup_redis(redis_url: str, prefix: str) -> None:
    """Delete every key of this run: its prefix's, and each job whose queue is ours (RQ's job,
    result and execution keys carry no prefix)."""
    from redis import Redis

    connection = Redis.from_url(redis_url)
    job_keys = [k for k in connection.scan_iter(match="rq:job:*", count=1000) if k.count(b":") == 2]
    pipe = connection.pipeline(transaction=False)
    for key in job_keys:
        pipe.hget(key, "origin")
    ours = [
        key.decode()[len("rq:job:") :]
        for key, origin in zip(job_keys, pipe.execute(), strict=True)
        if origin is not None and origin.decode().startswith(f"{prefix}:")
    ]
    keys = list(connection.scan_iter(match=f"*{prefix}*", count=1000))
    for job_id in ours:
        # (each execution's own key expires with its TTL)
        keys += [f"rq:job:{job_id}", f"rq:results:{job_id}", f"rq:executions:{job_id}"]
    for start in range(0, len(keys), 500):
        connection.delete(*keys[start : start + 500])
