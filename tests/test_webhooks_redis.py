"""Webhooks on the real Redis (as `ddserve webhook-worker` runs them beside the gateway): the
dispatcher and delivery threads of `WebhookService`, a job ended by one of the real terminal paths
(the gateway's cancel of a queued job, which publishes `finished`), the receiver down for the first
attempt — RQ's `Retry` schedules the next, the worker moves it back when due — then up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from standardwebhooks import Webhook

from ddserve.settings import Settings
from service.app import create_app
from service.webhooks.dispatch import message_id
from service.webhooks.keys import counts_key, delivery_queue
from service.webhooks.worker import WebhookService
from tests.gateway_support import write_config_zoo
from tests.redis_sandbox import REDIS_URL, sandbox, wait_until
from tests.test_webhooks import SECRET
from tests.webhook_receiver import Receiver, free_port

pytestmark = pytest.mark.redis


def test_the_webhook_worker_retries_on_redis_until_the_receiver_is_back(tmp_path: Path) -> None:
    with sandbox() as box:
        settings = Settings(
            redis_url=REDIS_URL,
            key_prefix=box.prefix,
            zoo_dir=write_config_zoo(tmp_path / "zoo"),
            storage_dir=tmp_path / "images",
            auth_enabled=False,
            signing_secret="test-secret",
            webhook_secret=SECRET,
            webhook_allowed_hosts="127.0.0.1",
            webhook_retry_base_s=1,
            webhook_retry_cap_s=1,
            webhook_poll_s=0.05,
        )
        port = free_port()
        service = WebhookService(settings, box.connection, name=f"{box.prefix}-hooks")
        box.worker_names.append(service.worker.name)
        receiver = Receiver(port=port)
        counts = counts_key(box.prefix)
        try:
            with TestClient(create_app(settings, box.connection)) as client:
                body = {"model": "tiny-ddpm", "seed": 1, "webhook": receiver.url()}
                job_id = client.post("/generate", json=body).json()["id"]
                box.job_ids.append(job_id)
                service.start()
                assert client.post(f"/jobs/{job_id}/cancel").json()["status"] == "canceled"
                wait_until(lambda: box.connection.hget(counts, "failed_attempts") == b"1", 15)
                receiver.start()
                (got,) = receiver.wait_for(1, timeout=15)
        finally:
            service.stop()
            receiver.stop()
            for key in box.connection.scan_iter(match="rq:job:*", count=1000):
                if key.count(b":") != 2:
                    continue  # a job's side keys (dependents, ...), not its hash
                if box.connection.hget(key, "origin") == delivery_queue(box.prefix).encode():
                    box.job_ids.append(key.decode().split(":")[2])
        assert got.headers["webhook-id"] == message_id(job_id, "completed")
        message = Webhook(SECRET).verify(got.body, got.headers)
        assert message["type"] == "job.completed"
        assert message["data"]["status"] == "canceled" and message["data"]["id"] == job_id
        assert json.loads(got.body) == message
        assert box.connection.hget(counts, "delivered") == b"1"
