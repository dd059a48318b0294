"""`ddserve webhook-worker`: the webhook dispatcher and delivery worker (needs Redis; no torch).

Runs `service.webhooks.worker.WebhookService` until SIGTERM or SIGINT, then finishes the delivery
in progress and stops. Scale it with replicas: they share the delivery queue."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from typing import Any

from ddserve.logs import configure_logging
from ddserve.settings import Settings

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", default=None, help="RQ worker name (default: a random one)")


def run(args: argparse.Namespace) -> int:
    settings = Settings()
    configure_logging(settings.log_level, settings.log_json)
    if settings.embedded:
        log.error("ddserve webhook-worker needs DDSERVE_REDIS_URL (`ddserve serve` embeds one)")
        return 2
    from service.app import connect
    from service.webhooks.worker import WebhookService

    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("webhook worker: signal %d, stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    service = WebhookService(settings, connect(settings), name=args.name).start()
    try:
        while not stop.wait(1.0):
            if not service.alive:
                log.error("webhook worker: a thread ended; exiting")
                return 1
    finally:
        service.stop()
    return 0
