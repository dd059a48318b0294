"""The Redis names of the webhook machinery, shared by the gateway (which registers a job's
webhook when it enqueues the job), the event dispatcher and the delivery worker.

Delivery jobs go on their own RQ queue, `{prefix}:_webhooks`: model names start with a letter or
digit (`ddserve.params.ModelName`), so no model's queue can be called that, and the GPU workers,
which listen on their models' queues only, never see a delivery.
"""

from __future__ import annotations

DELIVERY_FUNCTION = "service.webhooks.delivery.deliver"


def delivery_queue(prefix: str) -> str:
    """The RQ queue of webhook deliveries."""
    return f"{prefix}:_webhooks"


def watched_key(prefix: str) -> str:
    """Sorted set of the jobs that have a webhook and have not had their last event dispatched
    (score: enqueue time, ms)."""
    return f"{prefix}:webhooks:watched"


def sent_key(prefix: str, job_id: str) -> str:
    """Hash of what was dispatched for a job: `start`, `completed` (1 once queued for delivery),
    `progress` (the last step queued) and `progress_at` (when, unix s)."""
    return f"{prefix}:webhooks:sent:{job_id}"


def counts_key(prefix: str) -> str:
    """Hash of the deployment's delivery counts: delivered, failed_attempts, dropped, refused."""
    return f"{prefix}:webhooks:counts"
