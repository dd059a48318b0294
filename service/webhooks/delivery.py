"""Sending one webhook message: Standard Webhooks signing, SSRF checks, timeouts, no redirects.

`deliver` is the function of every delivery job on the webhook queue (`service.webhooks.keys`);
the webhook worker (`service.webhooks.worker`) runs it. One attempt:

1. the URL is checked again (`AddressPolicy.resolve`: DNS may have changed since submit — rebinding
   — so the delivery connects to an address it has just checked, sending the name as Host and TLS
   SNI); a refused URL is dropped at once (counted `refused`), never retried;
2. the body is signed as Standard Webhooks specifies (standardwebhooks.com; the `standardwebhooks`
   package): `webhook-signature: v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>` with
   `webhook-id` (stable across retries: receivers drop duplicates by it) and `webhook-timestamp`
   (unix seconds, fresh for each attempt: receivers refuse timestamps 5 minutes off). The key is
   the job's API key's secret (`webhook_secrets`), else the deployment's (`webhook_secret`);
3. it is POSTed with a connect timeout and a total one (`webhook_connect_timeout_s`,
   `webhook_timeout_s`: the whole exchange is cancelled at the total, a receiver that trickles its
   answer included), without following redirects (a 3xx is a failed attempt: following one would
   reach an unchecked address) and without proxies from the environment; the answer's body is not
   read. A 2xx answer is a delivery.

A failed attempt raises `DeliveryFailed`, and RQ's `Retry` of the delivery job schedules the next
attempt after the backoff computed when the event was queued (`dispatch.retry_intervals`); the
last attempt's failure, or one past `webhook_max_age_s`, is logged and counted `dropped`.

The secret and the HTTP settings must not travel through Redis with the job, and RQ calls a job's
function by its import path: the worker binds its `Sender` to the context of its own thread
(`current_sender`), where `deliver` finds it — scoped to that thread, not module state: two
embedded workers may hold different senders.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
import redis
from rq import get_current_job
from standardwebhooks import Webhook

from ddserve.settings import Settings
from service.webhooks.addresses import AddressPolicy, Destination, WebhookRefused
from service.webhooks.keys import counts_key

log = logging.getLogger(__name__)
USER_AGENT = "ddserve-webhooks/1"


class DeliveryFailed(RuntimeError):
    """An attempt that did not get a 2xx answer (RQ retries the delivery job)."""


class Secrets:
    """The signing secret of each API key's jobs (`webhook_secrets`), else the global one."""

    def __init__(self, default: str, per_key: str = "") -> None:
        self.default = Webhook(default) if default else None
        self.per_key: dict[str, Webhook] = {}
        for entry in (e.strip() for e in per_key.split(",")):
            if not entry:
                continue
            key_id, sep, secret = entry.partition("=")
            if not sep or not key_id.strip() or not secret.strip():
                raise ValueError("webhook_secrets entries are key_id=whsec_<base64>")
            self.per_key[key_id.strip()] = Webhook(secret.strip())

    @classmethod
    def of(cls, settings: Settings) -> Secrets:
        return cls(settings.webhook_secret, settings.webhook_secrets)

    @property
    def enabled(self) -> bool:
        return self.default is not None or bool(self.per_key)

    def for_owner(self, owner: str | None) -> Webhook | None:
        return self.per_key.get(owner or "", self.default)


@dataclass(frozen=True)
class Attempt:
    """How one attempt went: `delivered` (2xx), `refused` (URL not allowed now) or neither."""

    delivered: bool
    refused: bool
    detail: str


class Sender:
    """Signs and POSTs webhook messages for one deployment's settings."""

    def __init__(
        self,
        settings: Settings,
        connection: redis.Redis,
        *,
        policy: AddressPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.settings = settings
        self.connection = connection
        self.policy = policy or AddressPolicy.parse(settings.webhook_allowed_hosts)
        self.secrets = Secrets.of(settings)
        self.transport = transport  # tests: an httpx mock transport

    def count(self, outcome: str) -> None:
        """Add one to the deployment's count of `outcome` (a lost count is only logged)."""
        try:
            self.connection.hincrby(counts_key(self.settings.key_prefix), outcome, 1)
        except redis.RedisError as exc:
            log.warning("webhook count %s not recorded: %s", outcome, exc)

    def headers(self, msg_id: str, body: str, owner: str | None, now: float) -> dict[str, str]:
        """The Standard Webhooks headers of one attempt at `now` (unix s)."""
        signer = self.secrets.for_owner(owner)
        if signer is None:
            raise DeliveryFailed("no webhook secret is configured (DDSERVE_WEBHOOK_SECRET)")
        moment = datetime.fromtimestamp(math.floor(now), UTC)
        return {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "webhook-id": msg_id,
            "webhook-timestamp": str(math.floor(now)),
            "webhook-signature": signer.sign(msg_id, moment, body),
        }

    def attempt(self, url: str, msg_id: str, body: str, owner: str | None) -> Attempt:
        """One POST of the message (see the module docstring)."""
        try:
            destination = self.policy.resolve(url)
        except WebhookRefused as exc:
            return Attempt(False, True, f"{exc.code}: {exc}")
        headers = self.headers(msg_id, body, owner, time.time())
        headers["host"] = destination.host_header
        return asyncio.run(self._post(destination, headers, body))

    async def _post(self, destination: Destination, headers: dict[str, str], body: str) -> Attempt:
        s = self.settings
        timeout = httpx.Timeout(s.webhook_timeout_s, connect=s.webhook_connect_timeout_s)
        extensions = {"sni_hostname": destination.host} if destination.scheme == "https" else {}
        async with httpx.AsyncClient(
            timeout=timeout, follow_redirects=False, trust_env=False, transport=self.transport
        ) as client:
            last = "no address"
            for address in destination.addresses:  # the next one only if this one cannot connect
                request = client.build_request(
                    "POST",
                    destination.url_for(address),
                    content=body.encode(),
                    headers=headers,
                    extensions=extensions,
                )
                try:
                    async with asyncio.timeout(s.webhook_timeout_s):
                        response = await client.send(request, stream=True)
                        await response.aclose()  # the answer's body is not needed
                except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                    last = f"cannot connect to {address}: {type(exc).__name__}"
                    continue
                except (httpx.HTTPError, TimeoutError) as exc:
                    return Attempt(False, False, f"{address}: {type(exc).__name__} {exc}".strip())
                if 200 <= response.status_code < 300:
                    return Attempt(True, False, f"{response.status_code}")
                return Attempt(False, False, f"answered {response.status_code}")
            return Attempt(False, False, last)


current_sender: ContextVar[Sender] = ContextVar("current_sender")


def deliver(url: str, msg_id: str, body: str, owner: str | None, created_at: float) -> str:
    """The delivery job: one attempt; raises `DeliveryFailed` for RQ to retry it later."""
    sender = current_sender.get()
    result = sender.attempt(url, msg_id, body, owner)
    if result.delivered:
        sender.count("delivered")
        return f"delivered: {result.detail}"
    if result.refused:
        sender.count("refused")
        log.warning("webhook %s dropped: %s", msg_id, result.detail)
        return f"refused: {result.detail}"
    job = get_current_job()
    age = time.time() - created_at
    if job is None or not job.retries_left or age > sender.settings.webhook_max_age_s:
        sender.count("dropped")
        log.error("webhook %s dropped after %.0f s of attempts (%s)", msg_id, age, result.detail)
        return f"dropped: {result.detail}"  # no retry left (or too old): the job ends here
    sender.count("failed_attempts")
    log.info("webhook %s attempt failed (%s); retried later", msg_id, result.detail)
    raise DeliveryFailed(f"webhook {msg_id}: {result.detail}")
