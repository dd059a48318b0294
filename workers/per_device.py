"""`ddserve worker --devices all`: one worker process per CUDA device.

A worker drives one device (its running set, its memory, its compiled graphs), so a host with N GPUs
runs N workers: this parent starts `ddserve worker --device cuda:I` for each I with the rest of
its own arguments (names `NAME-gpuI` when `--name` is given, so a restarted host takes its workers'
names back), forwards SIGTERM/SIGINT to them (each drains warmly) and exits with the first
non-zero status once all have ended. In Kubernetes, prefer one pod per GPU (`nvidia.com/gpu: 1`);
this is for one container or machine with several GPUs (docs/gpu.md).
"""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger(__name__)

Launcher = Callable[[list[str]], Any]  # command → a Popen-like object (wait(), send_signal())


def device_commands(args: argparse.Namespace, count: int) -> list[list[str]]:
    """The `ddserve worker` command line of each device's process."""
    if count < 1:
        raise SystemExit("ddserve worker --devices all: this machine has no CUDA device")
    shared: list[str] = []
    for flag, value in (
        ("--models", args.models),
        ("--batching", args.batching),
        ("--max-batch", args.max_batch),
        ("--threads", args.threads),
    ):
        if value is not None:
            shared += [flag, str(value)]
    if args.burst:
        shared.append("--burst")
    commands = []
    for index in range(count):
        command = [sys.executable, "-m", "ddserve.cli", "worker", "--device", f"cuda:{index}"]
        if args.name:
            command += ["--name", f"{args.name}-gpu{index}"]
        commands.append(command + shared)
    return commands


def run_per_device(
    args: argparse.Namespace,
    *,
    count: int | None = None,
    launch: Launcher = subprocess.Popen,
    install_signals: bool = True,
) -> int:
    if count is None:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    children = [launch(command) for command in device_commands(args, count)]
    log.info("started %d workers, one per CUDA device", len(children))

    def forward(signum: int, _frame: Any) -> None:
        for child in children:
            child.send_signal(signum)

    if install_signals:
        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
    codes: Sequence[int] = [child.wait() for child in children]
    return next((code for code in codes if code), 0)
