"""The gateway's side of webhooks: a request's `webhook` and `webhook_events_filter` checked at
submit and turned into the job's `meta.webhook` = {"url", "events"}.

The URL is checked with the delivery's own rules (`service.webhooks.addresses`: scheme, allowlist,
DNS resolution, every address public) so that a refused URL is a 422 before anything is queued;
the delivery checks it again before each attempt (DNS may change). The check resolves the host in
the submission's worker thread, never on the event loop. Every job-creating route takes the two
fields (they are `ddserve.requests.JobBody`'s); the OpenAI Images API routes, synchronous for
their clients and with a body of OpenAI's, take none.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

from ddserve.params import WEBHOOK_EVENTS
from ddserve.settings import Settings
from service.errors import ApiError
from service.webhooks.addresses import AddressPolicy, Resolver, WebhookRefused


def _refused(code: str, message: str) -> ApiError:
    return ApiError(422, code, message, "webhook")


# A URL that passed is not resolved again for this long (per gateway process): a client sending
# many jobs to one receiver costs one lookup, not one per job (getaddrinfo was ~12 % of the
# gateway's CPU per job in benchmarks/bench_webhooks.py). This check only answers early; the
# delivery's own check, made before every attempt, is the one that guards against rebinding.
ACCEPTED_FOR_S = 30.0
MAX_ACCEPTED = 10_000


class WebhookTargets:
    """Checks the webhook of a request body for one deployment's settings."""

    def __init__(
        self,
        settings: Settings,
        resolver: Resolver = socket.getaddrinfo,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = AddressPolicy.parse(settings.webhook_allowed_hosts, resolver)
        self.enabled = bool(settings.webhook_secret or settings.webhook_secrets)
        self.clock = clock
        self._accepted: dict[str, float] = {}  # URL → until when it is taken without a lookup

    def check(self, url: str) -> None:
        """`WebhookRefused` unless `url` may be used (a recent pass is remembered)."""
        now = self.clock()
        if self._accepted.get(url, 0.0) > now:
            return
        self.policy.resolve(url)
        if len(self._accepted) >= MAX_ACCEPTED:
            self._accepted.clear()  # rare: many distinct receivers; start over
        self._accepted[url] = now + ACCEPTED_FOR_S

    def target(self, body: Any) -> dict[str, Any] | None:
        """The job's `meta.webhook` for `body` (None without a webhook); a 422 `ApiError` naming
        why a webhook is refused."""
        url: str | None = getattr(body, "webhook", None)
        events: list[str] | None = getattr(body, "webhook_events_filter", None)
        if url is None:
            if events is not None:
                raise ApiError(
                    422,
                    "missing_webhook",
                    "webhook_events_filter needs a webhook URL to send the events to",
                    "webhook_events_filter",
                )
            return None
        if not self.enabled:
            raise _refused(
                "webhooks_disabled",
                "this deployment sends no webhooks (its operator has set no "
                "DDSERVE_WEBHOOK_SECRET); poll GET /jobs/{id} or use Prefer: wait",
            )
        try:
            self.check(url)
        except WebhookRefused as exc:
            raise self._error(exc) from None
        chosen = set(events or WEBHOOK_EVENTS)
        return {"url": url, "events": [e for e in WEBHOOK_EVENTS if e in chosen]}

    @staticmethod
    def _error(exc: WebhookRefused) -> ApiError:
        """The API error of a refusal (each code written out for docs/errors.md's check)."""
        message = str(exc)
        if exc.code == "insecure_webhook":
            return _refused("insecure_webhook", message)
        if exc.code == "webhook_unresolvable":
            return _refused("webhook_unresolvable", message)
        if exc.code == "webhook_address_refused":
            return _refused("webhook_address_refused", message)
        return _refused("invalid_webhook", message)
