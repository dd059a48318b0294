"""Webhooks (issue #20 item 5): URL checks at submit (SSRF), events dispatched from the jobs' state
once each, Standard Webhooks signatures verified with the `standardwebhooks` library, retries with
backoff when the receiver is down, no redirects, the events filter, DNS rebinding at delivery.

The gateway and the webhook worker share an in-process fakeredis server (as in the embedded mode);
the receiver is a real HTTP server on 127.0.0.1 (allowlisted in these settings). The webhook
worker is driven step by step (`sweep`, `deliver_once`) so each test is deterministic."""

from __future__ import annotations

import base64
import json
import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
from fastapi.testclient import TestClient
from rq.job import Job
from rq.queue import Queue
from rq.registry import ScheduledJobRegistry
from rq.results import Result
from rq.utils import now, utcformat
from standardwebhooks import Webhook

from ddserve.jobs import META_WEBHOOK
from ddserve.settings import Settings
from service.webhooks.addresses import AddressPolicy, WebhookRefused, is_public
from service.webhooks.delivery import Sender
from service.webhooks.dispatch import EventDispatcher, message_id, retry_intervals
from service.webhooks.keys import counts_key, delivery_queue, watched_key
from service.webhooks.targets import WebhookTargets
from service.webhooks.worker import WebhookService
from tests.gateway_support import assert_error, make_app, png_b64, write_config_zoo
from tests.webhook_receiver import Receiver, free_port

SECRET = "whsec_" + base64.b64encode(b"ddserve-webhook-test-key-32bytes").decode()
PREFIX = "gwtest"
GEN = {"model": "tiny-ddpm", "n": 1, "seed": 1}


def resolver_of(table: dict[str, list[str]]) -> Any:
    """A `getaddrinfo` stand-in answering from `table` (name → addresses)."""

    def resolve(host: str, port: int, **_: Any) -> list[tuple[Any, ...]]:
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "unknown")
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
            for a in table[host]
        ]

    return resolve


# --- the address rules -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "10.1.2.3",  # RFC 1918
        "172.16.0.1",
        "192.168.1.1",
        "127.0.0.1",  # loopback
        "0.0.0.0",  # unspecified
        "169.254.169.254",  # link-local: the cloud metadata address
        "100.100.100.200",  # shared 100.64/10: Alibaba's metadata address
        "224.0.0.1",  # multicast (which `is_global` counts as global)
        "240.0.0.1",  # reserved
        "::1",
        "::",
        "fe80::1",
        "fd00:ec2::254",  # unique-local: AWS's IPv6 metadata address
        "ff02::1",
        "::ffff:127.0.0.1",  # IPv4-mapped
        "::ffff:10.0.0.1",
        "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
        "2002:a00:1::1",  # 6to4 of 10.0.0.1
    ],
)
def test_non_public_addresses_are_refused(address: str) -> None:
    policy = AddressPolicy([], resolver_of({"hook.example": [address]}))
    with pytest.raises(WebhookRefused) as caught:
        policy.resolve("https://hook.example/x")
    assert caught.value.code == "webhook_address_refused"
    literal = f"[{address}]" if ":" in address else address
    with pytest.raises(WebhookRefused):
        policy.resolve(f"https://{literal}/x")


def test_public_addresses_pass_and_one_private_address_refuses_the_name() -> None:
    import ipaddress

    for address in ("93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946", "::ffff:8.8.8.8"):
        assert is_public(ipaddress.ip_address(address)), address
    policy = AddressPolicy(
        [],
        resolver_of(
            {"ok.example": ["93.184.216.34"], "mixed.example": ["93.184.216.34", "10.0.0.1"]}
        ),
    )
    destination = policy.resolve("https://ok.example:8443/hook?x=1")
    assert destination.addresses == ("93.184.216.34",)
    assert destination.url_for("93.184.216.34") == "https://93.184.216.34:8443/hook?x=1"
    assert destination.host_header == "ok.example:8443"
    with pytest.raises(WebhookRefused, match=r"10\.0\.0\.1"):
        policy.resolve("https://mixed.example/hook")


def test_scheme_credentials_allowlist_and_resolution() -> None:
    table = {"public.example": ["93.184.216.34"], "internal.corp": ["10.9.8.7"]}
    policy = AddressPolicy.parse("internal.corp, 192.168.0.0/16", resolver_of(table))
    cases = {
        "http://public.example/h": "insecure_webhook",  # http only for allowlisted hosts
        "ftp://public.example/h": "invalid_webhook",
        "https://user:pw@public.example/h": "invalid_webhook",
        "/relative/path": "invalid_webhook",
        "https://public.example:99999/h": "invalid_webhook",
        "https://nowhere.example/h": "webhook_unresolvable",
    }
    for url, code in cases.items():
        with pytest.raises(WebhookRefused) as caught:
            policy.resolve(url)
        assert caught.value.code == code, url
    # allowlisted: by name (http and a private address), and by network (an IP literal in it)
    assert policy.resolve("http://internal.corp:8080/h").addresses == ("10.9.8.7",)
    assert policy.resolve("http://192.168.3.4/h").addresses == ("192.168.3.4",)


def test_retry_intervals_grow_with_jitter_and_stay_within_the_max_age() -> None:
    intervals = retry_intervals(2, 300, 3600, random.Random(0))
    assert sum(intervals) <= 3600
    assert all(1 <= d <= 300 for d in intervals)
    for k, d in enumerate(intervals):  # equal jitter: within [d_k / 2, d_k]
        cap = min(300, 2 * 2**k)
        assert cap / 2 - 0.5 <= d <= cap + 0.5
    assert intervals[:4] != retry_intervals(2, 300, 3600, random.Random(1))[:4]  # jittered
    assert retry_intervals(1, 1, 3, random.Random(0)) == [1, 1, 1]


# --- at submit -------------------------------------------------------------------------------


@pytest.fixture
def zoo(tmp_path: Path) -> Path:
    return write_config_zoo(tmp_path / "zoo")


def gateway(zoo: Path, tmp: Path, **overrides: Any) -> tuple[TestClient, fakeredis.FakeServer]:
    fields = {"webhook_secret": SECRET, "webhook_allowed_hosts": "127.0.0.1", **overrides}
    app, server = make_app(zoo, tmp, **fields)
    return TestClient(app), server


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/generate", GEN),
        ("/inpaint", {"model": "tiny-ddpm", "image": png_b64(), "mask": png_b64(value=255)}),
        ("/encode", {"model": "tiny-ae", "images": [png_b64()]}),
        ("/decode", {"model": "tiny-ae", "latents": [[[[0.0] * 4] * 4] * 2]}),
        ("/reconstruct", {"model": "tiny-ae", "images": [png_b64()]}),
    ],
)
def test_every_job_route_refuses_a_private_address_webhook(
    zoo: Path, tmp_path: Path, route: str, body: dict[str, Any]
) -> None:
    client, server = gateway(zoo, tmp_path)
    with client:
        for url in (
            "https://10.0.0.1/hook",
            "https://169.254.169.254/latest/meta-data",
            "https://[::ffff:127.0.0.1]/hook",
            "https://[fd00::1]/hook",
        ):
            answer = client.post(route, json={**body, "webhook": url})
            assert_error(answer, 422, "webhook_address_refused", "webhook")
        answer = client.post(route, json={**body, "webhook": "http://127.0.0.1:9/hook"})
        assert answer.status_code == 202, answer.text  # allowlisted here: accepted
    connection = fakeredis.FakeRedis(server=server)
    assert connection.zcard(watched_key(PREFIX)) == 1  # only the accepted job is watched


def test_submit_errors_name_the_webhook_field(zoo: Path, tmp_path: Path) -> None:
    client, _ = gateway(zoo, tmp_path)
    with client:
        bad = {
            "http://93.184.216.34/hook": "insecure_webhook",
            "https://user:secret@93.184.216.34/hook": "invalid_webhook",
            "gopher://93.184.216.34/": "invalid_webhook",
        }
        for url, code in bad.items():
            assert_error(client.post("/generate", json={**GEN, "webhook": url}), 422, code)
        answer = client.post("/generate", json={**GEN, "webhook_events_filter": ["completed"]})
        assert_error(answer, 422, "missing_webhook", "webhook_events_filter")
        answer = client.post(
            "/generate",
            json={**GEN, "webhook": "https://93.184.216.34/h", "webhook_events_filter": ["done"]},
        )
        assert answer.status_code == 422 and "webhook_events_filter" in answer.text
    off, _ = gateway(zoo, tmp_path, webhook_secret="")
    with off:
        answer = off.post("/generate", json={**GEN, "webhook": "https://93.184.216.34/h"})
        assert_error(answer, 422, "webhooks_disabled", "webhook")


def test_unresolvable_host_is_422(zoo: Path, tmp_path: Path) -> None:
    client, _ = gateway(zoo, tmp_path)
    with client:
        state = client.app.state.ddserve  # type: ignore[attr-defined]
        state.webhooks = WebhookTargets(state.settings, resolver_of({}))
        answer = client.post("/generate", json={**GEN, "webhook": "https://nowhere.example/h"})
        assert_error(answer, 422, "webhook_unresolvable", "webhook")


def test_a_url_that_passed_is_not_resolved_again_for_a_while(zoo: Path, tmp_path: Path) -> None:
    calls: list[str] = []
    table = {"hooks.example": ["93.184.216.34"]}
    resolve = resolver_of(table)

    def counting(host: str, port: int, **kw: Any) -> list[tuple[Any, ...]]:
        calls.append(host)
        return resolve(host, port, **kw)

    clock = [0.0]
    settings = Settings(webhook_secret=SECRET)
    targets = WebhookTargets(settings, counting, clock=lambda: clock[0])
    targets.check("https://hooks.example/a")
    targets.check("https://hooks.example/a")
    assert calls == ["hooks.example"]
    clock[0] += 31.0  # past ACCEPTED_FOR_S: resolved again, and a rebinding is seen
    table["hooks.example"] = ["10.0.0.1"]
    with pytest.raises(WebhookRefused):
        targets.check("https://hooks.example/a")
    assert calls == ["hooks.example"] * 2


# --- dispatch and delivery -------------------------------------------------------------------


class Stack:
    """A gateway, a webhook service driven by hand and a receiver, on one fakeredis server."""

    def __init__(self, zoo: Path, tmp: Path, receiver: Receiver, **overrides: Any) -> None:
        fields = {"webhook_retry_base_s": 1, "webhook_retry_cap_s": 1, "webhook_poll_s": 0.05}
        self.client, server = gateway(zoo, tmp, **{**fields, **overrides})
        self.client.__enter__()
        self.state = self.client.app.state.ddserve  # type: ignore[attr-defined]
        self.settings: Settings = self.state.settings
        self.connection = fakeredis.FakeRedis(server=server)
        self.service = WebhookService(
            self.settings, self.connection, storage=self.state.storage, base_url="http://gw"
        )
        from service.webhooks.delivery import current_sender

        current_sender.set(self.service.sender)  # as the delivery thread does
        self.service.worker.register_birth()
        self.receiver = receiver

    def close(self) -> None:
        self.service.worker.register_death()
        self.client.__exit__(None, None, None)

    def submit(self, **fields: Any) -> str:
        body = {**GEN, "webhook": self.receiver.url(), **fields}
        answer = self.client.post("/generate", json=body)
        assert answer.status_code == 202, answer.text
        return answer.json()["id"]

    def job(self, job_id: str) -> Job:
        return Job.fetch(job_id, connection=self.connection)

    def start(self, job_id: str) -> None:
        job = self.job(job_id)
        job.set_status("started")
        self.connection.hset(job.key, "started_at", utcformat(now()))

    def progress(self, job_id: str, step: int, total: int = 10) -> None:
        job = self.job(job_id)
        job.meta["progress"] = {"step": step, "total": total}
        job.save_meta()

    def succeed(self, job_id: str) -> None:
        job = self.job(job_id)
        job.set_status("finished")
        self.connection.hset(job.key, "ended_at", utcformat(now()))
        output = {"images": [{"key": f"{job_id}/0.png", "width": 8, "height": 8, "seed": 1}]}
        Result.create(job, Result.Type.SUCCESSFUL, ttl=60, return_value=output)

    def deliver_all(self) -> int:
        ran = 0
        while self.service.deliver_once(timeout=None):
            ran += 1
        return ran

    def counts(self) -> dict[str, int]:
        raw = self.connection.hgetall(counts_key(PREFIX))
        return {k.decode(): int(v) for k, v in raw.items()}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver().start()
    yield server
    server.stop()


@pytest.fixture
def stack(zoo: Path, tmp_path: Path, receiver: Receiver) -> Iterator[Stack]:
    built = Stack(zoo, tmp_path, receiver)
    yield built
    built.close()


def verified(received: Any) -> dict[str, Any]:
    """The message, after the library's own verification of its signature and timestamp."""
    return Webhook(SECRET).verify(received.body, received.headers)


def test_start_progress_completed_are_signed_and_verify(stack: Stack) -> None:
    job_id = stack.submit()
    meta = stack.job(job_id).meta[META_WEBHOOK]
    assert meta == {"url": stack.receiver.url(), "events": ["start", "progress", "completed"]}
    assert stack.service.dispatcher.sweep() == 0  # queued: nothing to say yet
    stack.start(job_id)
    stack.progress(job_id, 3)
    assert stack.service.dispatcher.sweep() == 2  # start, progress 3
    stack.succeed(job_id)
    assert stack.service.dispatcher.sweep() == 1  # completed (progress 3 already sent)
    assert stack.deliver_all() == 3
    got = stack.receiver.wait_for(3)
    messages = [verified(r) for r in got]
    assert [m["type"] for m in messages] == ["job.start", "job.progress", "job.completed"]
    assert [r.headers["webhook-id"] for r in got] == [
        message_id(job_id, "start"),
        message_id(job_id, "progress", 3),
        message_id(job_id, "completed"),
    ]
    assert messages[1]["data"]["progress"]["step"] == 3
    done = messages[2]["data"]
    assert done["id"] == job_id and done["status"] == "succeeded"
    assert done["output"]["images"][0]["url"].startswith(f"http://gw/images/{job_id}/0.png?")
    assert all(r.path == "/hook" for r in got)
    assert stack.connection.zcard(watched_key(PREFIX)) == 0  # completed: no longer watched
    assert stack.counts() == {"delivered": 3}
    metrics = stack.client.get("/metrics").text
    assert 'ddserve_webhook_deliveries_total{outcome="delivered"} 3.0' in metrics
    # a tampered body or another secret does not verify
    with pytest.raises(Exception, match="signature"):
        Webhook(SECRET).verify(got[0].body.replace("start", "stert"), got[0].headers)


def test_each_event_is_queued_once_and_progress_is_throttled(
    stack: Stack, zoo: Path, tmp_path: Path
) -> None:
    job_id = stack.submit()
    stack.start(job_id)
    stack.progress(job_id, 1)
    other = EventDispatcher(stack.connection, stack.settings, stack.state.storage)
    assert stack.service.dispatcher.sweep() == 2
    assert other.sweep() == 0  # a second webhook worker finds both marked
    stack.progress(job_id, 2)
    assert stack.service.dispatcher.sweep() == 0  # within webhook_poll_s of the last progress
    time.sleep(stack.settings.webhook_poll_s)
    assert other.sweep() == 1
    stack.succeed(job_id)
    assert stack.service.dispatcher.sweep() + other.sweep() == 1
    queue = Queue(delivery_queue(PREFIX), connection=stack.connection)
    ids = [j.kwargs["msg_id"] for j in queue.get_jobs()]
    assert sorted(ids) == sorted(
        [
            message_id(job_id, "start"),
            message_id(job_id, "progress", 1),
            message_id(job_id, "progress", 2),
            message_id(job_id, "completed"),
        ]
    )


def test_events_filter_is_respected(stack: Stack) -> None:
    job_id = stack.submit(webhook_events_filter=["completed"])
    stack.start(job_id)
    stack.progress(job_id, 5)
    assert stack.service.dispatcher.sweep() == 0
    stack.succeed(job_id)
    assert stack.service.dispatcher.sweep() == 1
    assert stack.deliver_all() == 1
    (only,) = stack.receiver.wait_for(1)
    assert verified(only)["type"] == "job.completed"
    quiet = stack.submit(webhook_events_filter=["start"])
    stack.start(quiet)
    stack.succeed(quiet)
    assert stack.service.dispatcher.sweep() == 1  # start only; the job then leaves the set
    assert stack.connection.zscore(watched_key(PREFIX), quiet) is None


def test_a_job_canceled_in_its_queue_sends_completed_without_start(stack: Stack) -> None:
    job_id = stack.submit()
    assert stack.client.post(f"/jobs/{job_id}/cancel").status_code in (200, 202)
    assert stack.service.dispatcher.sweep() == 1
    stack.deliver_all()
    (message,) = [verified(r) for r in stack.receiver.wait_for(1)]
    assert message["type"] == "job.completed" and message["data"]["status"] == "canceled"


def test_receiver_down_is_retried_with_the_same_id_until_it_is_back(
    zoo: Path, tmp_path: Path
) -> None:
    port = free_port()
    down = Receiver(port=port)  # not started: connections are refused
    stack = Stack(zoo, tmp_path, down)
    try:
        job_id = stack.submit(webhook_events_filter=["completed"])
        stack.succeed(job_id)
        assert stack.service.dispatcher.sweep() == 1
        assert stack.deliver_all() == 1  # the attempt failed: scheduled again
        scheduled = ScheduledJobRegistry(queue=stack.service.queue)
        assert scheduled.count == 1
        assert stack.counts() == {"failed_attempts": 1}
        up = Receiver(port=port).start()
        try:
            deadline = time.monotonic() + 10
            while not up.received and time.monotonic() < deadline:
                stack.service.deliver_once(timeout=None)
                time.sleep(0.1)
            (got,) = up.wait_for(1)
        finally:
            up.stop()
        assert got.headers["webhook-id"] == message_id(job_id, "completed")
        assert verified(got)["data"]["id"] == job_id
        assert stack.counts() == {"failed_attempts": 1, "delivered": 1}
        assert scheduled.count == 0
    finally:
        stack.close()


def test_last_failed_attempt_is_dropped_and_counted(zoo: Path, tmp_path: Path) -> None:
    stack = Stack(zoo, tmp_path, Receiver(port=free_port()), webhook_max_age_s=1)
    try:
        job_id = stack.submit(webhook_events_filter=["completed"])
        stack.succeed(job_id)
        stack.service.dispatcher.sweep()
        time.sleep(1.1)  # past webhook_max_age_s: no retry is left worth making
        stack.deliver_all()
        assert stack.counts() == {"dropped": 1}
        assert ScheduledJobRegistry(queue=stack.service.queue).count == 0
    finally:
        stack.close()


def test_redirects_are_not_followed(zoo: Path, tmp_path: Path) -> None:
    target = Receiver().start()
    redirecting = Receiver(status=307, location=target.url("/elsewhere")).start()
    # The retry of the failed attempt far away: with the suite's 1 s, a slow first attempt let
    # `deliver_all` run the retry too, and the receiver saw two requests (flaky on a slow CPU).
    stack = Stack(zoo, tmp_path, redirecting, webhook_retry_base_s=60, webhook_retry_cap_s=60)
    try:
        job_id = stack.submit(webhook_events_filter=["completed"])
        stack.succeed(job_id)
        stack.service.dispatcher.sweep()
        stack.deliver_all()
        assert len(redirecting.wait_for(1)) == 1
        time.sleep(0.2)
        assert target.received == []  # the Location was never requested
        assert stack.counts() == {"failed_attempts": 1}  # a 3xx is a failed attempt
    finally:
        stack.close()
        target.stop()
        redirecting.stop()


def test_dns_rebinding_is_refused_at_delivery(
    zoo: Path, tmp_path: Path, receiver: Receiver
) -> None:
    stack = Stack(zoo, tmp_path, receiver)
    try:
        table = {"hooks.example": ["93.184.216.34"]}
        stack.state.webhooks = WebhookTargets(stack.settings, resolver_of(table))
        job_id = stack.submit(
            webhook="https://hooks.example/h", webhook_events_filter=["completed"]
        )
        stack.succeed(job_id)
        stack.service.dispatcher.sweep()
        table["hooks.example"] = ["10.0.0.7"]  # the name now points inside
        stack.service.sender = Sender(
            stack.settings,
            stack.connection,
            policy=AddressPolicy.parse(stack.settings.webhook_allowed_hosts, resolver_of(table)),
        )
        from service.webhooks.delivery import current_sender

        current_sender.set(stack.service.sender)
        stack.deliver_all()
        assert stack.counts() == {"refused": 1}  # dropped at once, never retried
        assert ScheduledJobRegistry(queue=stack.service.queue).count == 0
        assert receiver.received == []
    finally:
        stack.close()


def test_per_key_secret_signs_that_keys_jobs(zoo: Path, tmp_path: Path, receiver: Receiver) -> None:
    from service.auth import hash_key

    other = "whsec_" + base64.b64encode(b"another-key-of-32-bytes-for-test").decode()
    stack = Stack(
        zoo,
        tmp_path,
        receiver,
        auth_enabled=True,
        api_keys=f"alice:{hash_key('alice-key')}",
        webhook_secrets=f"alice={other}",
    )
    try:
        stack.client.headers["Authorization"] = "Bearer alice-key"
        job_id = stack.submit(webhook_events_filter=["completed"])
        stack.succeed(job_id)
        stack.service.dispatcher.sweep()
        stack.deliver_all()
        (got,) = receiver.wait_for(1)
        assert Webhook(other).verify(got.body, got.headers)["data"]["id"] == job_id
        with pytest.raises(Exception, match="signature"):
            Webhook(SECRET).verify(got.body, got.headers)
    finally:
        stack.close()


def test_the_service_threads_deliver_on_their_own(
    zoo: Path, tmp_path: Path, receiver: Receiver
) -> None:
    """The dispatcher and delivery threads, as `ddserve webhook-worker` and the embedded mode run
    them: a finished job's completed event arrives without any manual step."""
    stack = Stack(zoo, tmp_path, receiver)
    service = WebhookService(stack.settings, stack.connection, storage=stack.state.storage).start()
    try:
        job_id = stack.submit()
        stack.start(job_id)
        stack.succeed(job_id)
        got = receiver.wait_for(2)
        assert [json.loads(r.body)["type"] for r in got] == ["job.start", "job.completed"]
        assert all(verified(r)["data"]["id"] == job_id for r in got)
    finally:
        service.stop()
        stack.close()


def test_a_real_job_of_the_embedded_stack_reaches_the_receiver(
    tmp_path: Path, receiver: Receiver
) -> None:
    """End to end: `LocalServer` (gateway, batching worker thread, webhook worker) samples a tiny
    diffusion model; the receiver gets start, progress and completed, each verifying, the last
    with the finished job's image link."""
    from ddserve.client import Client
    from tests.client_support import DIFFUSION, tiny_stack

    with tiny_stack(
        tmp_path,
        webhook_secret=SECRET,
        webhook_allowed_hosts="127.0.0.1",
        webhook_poll_s=0.05,
    ) as stack:
        with Client(stack.url) as client:
            job = client.generate(DIFFUSION, n=1, seed=3, webhook=receiver.url())
            assert job.status == "succeeded"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            types = [json.loads(r.body)["type"] for r in receiver.received]
            if "job.completed" in types:
                break
            time.sleep(0.05)
        messages = [verified(r) for r in receiver.received]
    types = [m["type"] for m in messages]
    assert types[0] == "job.start" and types[-1] == "job.completed", types
    assert set(types) <= {"job.start", "job.progress", "job.completed"}
    ids = [r.headers["webhook-id"] for r in receiver.received]
    assert len(ids) == len(set(ids))  # one delivery per (job, event)
    done = messages[-1]["data"]
    assert done["id"] == job.id and done["status"] == "succeeded"
    assert done["output"]["images"][0]["url"].startswith(f"{stack.url}/images/")


def test_the_readme_receiver_accepts_deliveries_and_refuses_forgeries(
    zoo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util
    import threading
    from http.server import ThreadingHTTPServer

    import httpx

    root = Path(__file__).resolve().parents[1]
    path = root / "examples" / "webhook_receiver.py"
    assert path.read_text() in (root / "README.md").read_text()  # the README shows this file
    spec = importlib.util.spec_from_file_location("webhook_receiver_example", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.Receiver.secret = SECRET
    example.Receiver.log_message = lambda *_: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), example.Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stack = Stack(zoo, tmp_path, Receiver(port=server.server_address[1]))
    try:
        job_id = stack.submit(webhook_events_filter=["completed"])
        stack.succeed(job_id)
        stack.service.dispatcher.sweep()
        assert stack.deliver_all() == 1
        assert stack.counts() == {"delivered": 1}
        assert f"job.completed {job_id} succeeded" in capsys.readouterr().out
        forged = httpx.post(
            Receiver(port=server.server_address[1]).url(),
            content=b'{"type": "job.completed"}',
            headers={
                "webhook-id": "msg_x",
                "webhook-timestamp": str(int(time.time())),
                "webhook-signature": "v1," + base64.b64encode(b"0" * 32).decode(),
            },
        )
        assert forged.status_code == 400
    finally:
        stack.close()
        server.shutdown()
        server.server_close()


def test_the_webhook_worker_command_needs_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    from ddserve.cli import main

    monkeypatch.delenv("DDSERVE_REDIS_URL", raising=False)
    assert main(["webhook-worker"]) == 2  # the embedded `ddserve serve` runs it in-process


def test_https_goes_to_the_checked_address_with_the_name_as_host_and_sni() -> None:
    """The delivery connects to the address it has just checked (no second lookup a rebinding
    could answer), and names the host in Host and TLS SNI, so the certificate is checked
    against the name."""
    import httpx

    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200)

    settings = Settings(webhook_secret=SECRET, key_prefix=PREFIX)
    policy = AddressPolicy([], resolver_of({"hooks.example": ["93.184.216.34"]}))
    connection = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    sender = Sender(settings, connection, policy=policy, transport=httpx.MockTransport(answer))
    result = sender.attempt("https://hooks.example:8443/in?x=1", "msg_1", '{"a":1}', None)
    assert result.delivered
    (request,) = seen
    assert str(request.url) == "https://93.184.216.34:8443/in?x=1"
    assert request.headers["host"] == "hooks.example:8443"
    assert request.extensions["sni_hostname"] == "hooks.example"
    message = Webhook(SECRET).verify(request.content, dict(request.headers))
    assert message == {"a": 1}


def test_a_receiver_that_trickles_is_cut_at_the_total_timeout() -> None:
    """A receiver that trickles its answer, a byte every 0.1 s (each read well within any per-read
    timeout): the attempt still ends at the total `webhook_timeout_s`, a failed attempt."""
    import threading

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        accepted: list[socket.socket] = []

        def trickle() -> None:
            conn = listener.accept()[0]
            accepted.append(conn)
            try:
                conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                for _ in range(50):  # 5 s of one byte at a time
                    time.sleep(0.1)
                    conn.sendall(b"a")
            except OSError:
                pass  # the client gave up: what this test wants

        threading.Thread(target=trickle, daemon=True).start()
        settings = Settings(
            webhook_secret=SECRET, webhook_allowed_hosts="127.0.0.1", webhook_timeout_s=0.5
        )
        sender = Sender(settings, fakeredis.FakeRedis(server=fakeredis.FakeServer()))
        began = time.monotonic()
        result = sender.attempt(f"http://127.0.0.1:{port}/h", "msg_1", "{}", None)
        took = time.monotonic() - began
        for conn in accepted:
            conn.close()
    assert not result.delivered and not result.refused
    assert 0.4 <= took < 3.0, took
