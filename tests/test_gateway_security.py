"""The security items of issue #7 that other gateway tests do not already prove: where API keys come
from (environment, file), auth on by default outside the embedded mode, constant-time comparisons,
no secret in any log over a whole request cycle, ownership of a job's image links, path traversal
through `/images`, decompression bombs and masks, and limits (rate, queue, idempotency) shared by
every gateway process through Redis.

Every test runs on an in-process fakeredis server; none starts a server or a worker.
"""

from __future__ import annotations

import base64
import hmac
import io
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import fakeredis
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image, ImageFile
from rq.job import Job
from rq.results import Result

import ddserve.embedded
import service.auth
import service.cli
from ddserve.logs import JsonFormatter, PlainFormatter
from ddserve.settings import Settings
from ddserve.storage import signing
from ddserve.storage.local import LocalStorage
from service.app import create_app
from service.auth import KeyConfigError, KeyRing, hash_key, load_keys
from service.ratelimit import RateLimiter
from tests.gateway_support import assert_error, png_b64, write_config_zoo

ALICE, BOB = "alice-key-0f3c9a", "bob-key-7d21e4"
SIGNING_SECRET = "signing-secret-5b8e"
GEN = {"model": "tiny-ddpm", "class_label": 1, "seed": 1}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_config_zoo(tmp_path_factory.mktemp("zoo"))


def gateway(
    zoo: Path, tmp: Path, server: fakeredis.FakeServer | None = None, **overrides: Any
) -> FastAPI:
    """A gateway on `server` (a fresh one by default): two gateways on one server are two gateway
    processes on one Redis."""
    fields: dict[str, Any] = {
        "zoo_dir": zoo,
        "storage_dir": tmp / "images",
        "signing_secret": SIGNING_SECRET,
        "key_prefix": "sectest",
        "auth_enabled": True,
        "api_keys": f"alice:{hash_key(ALICE)},bob:{hash_key(BOB)}",
    }
    fields.update(overrides)
    server = server if server is not None else fakeredis.FakeServer()
    return create_app(Settings(**fields), fakeredis.FakeRedis(server=server))


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def client(zoo: Path, tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(gateway(zoo, tmp_path)) as c:
        yield c


def finish_with_image(client: TestClient, job_id: str) -> str:
    """Mark a queued job succeeded with one stored image, as a worker would; its storage key."""
    state = client.app.state.ddserve
    key = f"{job_id}/0.png"
    state.storage.put(key, base64.b64decode(png_b64()), "image/png")
    job = Job.fetch(job_id, connection=state.connection)
    job.set_status("finished")
    output = {
        "images": [{"key": key, "width": 8, "height": 8, "seed": 1}],
        "latents": None,
        "trajectory_key": None,
    }
    Result.create(job, Result.Type.SUCCESSFUL, ttl=60, return_value=output)
    return key


# --- where keys come from, and auth by default ---------------------------------------------------


def test_keys_from_the_environment_and_a_file(
    zoo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# rotated 2026-11\nbob:{hash_key(BOB)}\n")
    monkeypatch.setenv("DDSERVE_API_KEYS", f"alice:{hash_key(ALICE)}")
    monkeypatch.setenv("DDSERVE_API_KEYS_FILE", str(keys_file))
    settings = Settings(zoo_dir=zoo, storage_dir=tmp_path / "img", signing_secret="s")
    assert settings.auth_enabled  # on unless turned off
    assert ALICE not in settings.api_keys and BOB not in keys_file.read_text()  # only hashes
    client = TestClient(create_app(settings, fakeredis.FakeRedis(server=fakeredis.FakeServer())))
    assert client.get("/models", headers=auth(ALICE)).status_code == 200  # from the environment
    assert client.get("/models", headers=auth(BOB)).status_code == 200  # from the file
    assert_error(client.get("/models", headers=auth("carol")), 401, "invalid_api_key")
    # a key's hash is not a key: presenting the stored digest gets nowhere
    assert_error(client.get("/models", headers=auth(hash_key(ALICE))), 401, "invalid_api_key")
    # a plaintext key put in the file by mistake stops the start, and is not echoed
    keys_file.write_text(f"bob:{hash_key(BOB)}\n{ALICE}\n")
    with pytest.raises(KeyConfigError, match=r"keys:2") as info:
        create_app(settings, fakeredis.FakeRedis(server=fakeredis.FakeServer()))
    assert ALICE not in str(info.value)


def test_auth_is_on_by_default_and_without_keys_nobody_gets_in(
    zoo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert Settings.model_fields["auth_enabled"].default is True
    caplog.set_level(logging.WARNING, logger="ddserve.service")
    app = create_app(
        Settings(zoo_dir=zoo, storage_dir=tmp_path / "img", signing_secret="s"),
        fakeredis.FakeRedis(server=fakeredis.FakeServer()),
    )
    assert "no API keys are configured" in caplog.text
    client = TestClient(app)
    assert_error(client.post("/generate", json=GEN), 401, "missing_api_key")
    assert_error(client.post("/generate", json=GEN, headers=auth("")), 401, "missing_api_key")
    assert_error(client.post("/generate", json=GEN, headers=auth("x")), 401, "invalid_api_key")
    assert client.get("/healthz").status_code == 200


def test_every_documented_route_but_health_and_image_links_needs_a_key(client: TestClient) -> None:
    """From the OpenAPI document, so a route added later without the key check fails here."""
    open_routes = {"/healthz", "/readyz", "/images/{key}"}
    paths = client.get("/openapi.json").json()["paths"]
    checked = 0
    for path, operations in paths.items():
        url = path.replace("{job_id}", "some-job").replace("{key}", "job/0.png")
        for method in operations:
            answer = client.request(method.upper(), url, json={"model": "tiny-ddpm"})
            if path in open_routes:
                assert answer.status_code != 401, (method, path)
                continue
            assert_error(answer, 401, "missing_api_key")
            assert answer.headers["www-authenticate"] == "Bearer"
            checked += 1
    assert checked >= 9  # generate, encode, decode, reconstruct, inpaint, job, cancel, models, …


def test_the_gateway_mode_keeps_auth_on_and_the_embedded_mode_turns_it_off_and_says_so(
    zoo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    served: list[FastAPI] = []
    monkeypatch.setattr(
        service.cli, "serve_and_announce", lambda config, settings, *_: served.append(config.app)
    )
    monkeypatch.setenv("DDSERVE_SIGNING_SECRET", "")  # run_gateway writes it: restored after
    caplog.set_level(logging.INFO)
    gateway_settings = Settings(
        zoo_dir=zoo,
        storage_dir=tmp_path / "img",
        redis_url="redis://:redis-password-93@127.0.0.1:1/0",  # never connected to here
    )
    assert service.cli.run_gateway(gateway_settings, 1) == 0
    assert served[-1].state.ddserve.settings.auth_enabled
    assert_error(TestClient(served[-1]).get("/models"), 401, "missing_api_key")
    generated_secret = gateway_settings.signing_secret
    assert generated_secret and generated_secret not in caplog.text
    assert "redis-password-93" not in caplog.text and ":***@" in caplog.text

    import workers.embedded

    class Handle:
        ready = threading.Event()
        error = None

        def stop(self) -> None:
            pass

    Handle.ready.set()

    monkeypatch.setattr(workers.embedded, "start_worker_thread", lambda *_: Handle())
    embedded_settings = Settings(zoo_dir=zoo, storage_dir=tmp_path / "img2", auth_enabled=True)
    assert ddserve.embedded.serve_embedded(embedded_settings, 1) == 0
    assert not served[-1].state.ddserve.settings.auth_enabled
    assert "auth is OFF" in caplog.text
    assert TestClient(served[-1]).get("/models").status_code == 200


# --- constant-time comparisons ---------------------------------------------------------------------


def test_key_and_link_checks_compare_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, Any]] = []
    compare = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return compare(a, b)

    ring = KeyRing(load_keys(",".join(f"k{i}:{hash_key(f'key-{i}')}" for i in range(5)), None))
    monkeypatch.setattr(service.auth.hmac, "compare_digest", spy)
    assert ring.identify("key-0") == "k0"
    assert len(calls) == 5  # a match on the first key still compares all of them: no early exit
    calls.clear()
    assert ring.identify("nobody") is None and len(calls) == 5
    assert all(isinstance(a, bytes) and len(a) == 32 for a, _ in calls)  # digests, not the token

    calls.clear()
    monkeypatch.setattr(signing.hmac, "compare_digest", spy)
    signer = signing.LinkSigner("secret", ttl_s=60, clock=lambda: 0.0)
    sig = signer.signature("job/0.png", 60)
    assert signer.verify("job/0.png", "60", sig) and not signer.verify("job/0.png", "60", "0" * 64)
    assert len(calls) == 2


# --- no secret in any log ------------------------------------------------------------------------


def test_no_key_secret_or_link_signature_in_any_log(
    zoo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A whole cycle with auth on — 401s, a job, its signed image link, a forged link, another key's
    404, a cancel — logged at DEBUG in both formats: no key, key hash, signing secret or signature."""
    caplog.set_level(logging.DEBUG)
    with TestClient(gateway(zoo, tmp_path)) as client:
        client.get("/models")
        client.get("/models", headers=auth("wrong-key-3141"))
        client.get("/models", headers={"Authorization": f"Basic {ALICE}"})
        job_id = client.post("/generate", json=GEN, headers=auth(ALICE)).json()["id"]
        finish_with_image(client, job_id)
        url = client.get(f"/jobs/{job_id}", headers=auth(ALICE)).json()["output"]["images"][0]
        signature = url["url"].split("sig=")[1]
        assert client.get(url["url"]).status_code == 200
        client.get(url["url"].replace("sig=", "sig=f"))
        client.get(f"/jobs/{job_id}", headers=auth(BOB))
        client.post(f"/jobs/{job_id}/cancel", headers=auth(ALICE))
    assert any(r.name == "ddserve.access" for r in caplog.records)  # the access log did run
    # httpx's records are the test client's own (a client logs the URLs it fetches), not the server's
    records = [r for r in caplog.records if not r.name.startswith("httpx")]
    formatter, plain = JsonFormatter(), PlainFormatter()
    text = "".join(formatter.format(r) + plain.format(r) + str(r.__dict__) for r in records)
    for secret in (ALICE, BOB, "wrong-key-3141", hash_key(ALICE), SIGNING_SECRET, signature):
        assert secret not in text


# --- a key sees only its own jobs, images included -----------------------------------------------


def test_another_keys_job_and_its_images_stay_out_of_reach(client: TestClient) -> None:
    job_id = client.post("/generate", json=GEN, headers=auth(ALICE)).json()["id"]
    key = finish_with_image(client, job_id)
    view = client.get(f"/jobs/{job_id}", headers=auth(ALICE)).json()
    link = view["output"]["images"][0]["url"]
    expires = int(link.split("expires=")[1].split("&")[0])
    assert abs(expires - (time.time() + Settings().link_ttl_s)) < 60  # it expires, in 1 h
    # Bob learns neither the job nor its links, and cannot cancel it
    assert_error(client.get(f"/jobs/{job_id}", headers=auth(BOB)), 404, "job_not_found")
    assert_error(client.post(f"/jobs/{job_id}/cancel", headers=auth(BOB)), 404, "job_not_found")
    assert_error(
        client.get(f"/jobs/{job_id}", headers={**auth(BOB), "Prefer": "wait=1"}),
        404,
        "job_not_found",
    )
    # knowing the job id is not enough for the image: the link's signature is the credential
    assert_error(client.get(f"/images/{key}", headers=auth(BOB)), 404, "image_not_found")
    forged = f"/images/{key}?expires={expires}&sig={'0' * 64}"
    assert_error(client.get(forged, headers=auth(BOB)), 404, "image_not_found")
    # Alice's link works for whoever she hands it to, with no key (the contract's signed links)
    assert client.get(link).status_code == 200
    assert client.get(f"/jobs/{job_id}", headers=auth(ALICE)).json()["status"] == "succeeded"


# --- storage keys and path traversal -------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "../secret.png",
        "..%2Fsecret.png",
        "%2E%2E/%2E%2E/secret.png",
        "job/../../secret.png",
        "%2Fetc%2Fpasswd",
        "job%5C..%5Csecret.png",
        "job/.hidden.png",
        "job/%00.png",
    ],
)
def test_image_route_refuses_traversal_even_with_a_valid_signature(
    client: TestClient, tmp_path: Path, key: str
) -> None:
    (tmp_path / "secret.png").write_bytes(b"\x89PNG top secret")
    (tmp_path / "images" / "job").mkdir(parents=True, exist_ok=True)
    storage = client.app.state.ddserve.storage
    from urllib.parse import unquote

    sig = storage.signer.signature(unquote(key), 4_000_000_000)  # what a forger would need
    r = client.get(f"/images/{key}?expires=4000000000&sig={sig}")
    assert r.status_code == 404 and b"top secret" not in r.content
    assert set(r.json()) == {"error"}


@pytest.mark.parametrize(
    "query",
    [
        "expires=4000000000&sig=%C3%A9",  # a non-ASCII signature
        "expires=4000000000&sig=%F0%9F%94%91" + "0" * 60,
        "expires=4000000000&sig=%FF%FE",  # not even UTF-8
        "expires=" + "9" * 5000 + "&sig=ab",  # past int()'s digit limit
        "expires=-1&sig=",
        "expires=1e9&sig=00",
    ],
)
def test_hostile_link_parameters_are_a_404_never_a_500(client: TestClient, query: str) -> None:
    client.app.state.ddserve.storage.put("job-1/0.png", b"\x89PNG", "image/png")
    assert_error(client.get(f"/images/job-1/0.png?{query}"), 404, "image_not_found")


def test_local_storage_refuses_keys_outside_its_root(tmp_path: Path) -> None:
    from ddserve.storage import InvalidKeyError

    storage = LocalStorage(tmp_path / "root", "s", 60)
    for key in ("../x.png", "/tmp/x.png", "a/../../x.png", "a\\..\\x.png", "a b.png", "a/\0.png"):
        with pytest.raises(InvalidKeyError):
            storage.put(key, b"x", "image/png")
        with pytest.raises(InvalidKeyError):
            storage.get(key)
        with pytest.raises(InvalidKeyError):
            storage.url(key, "http://h")
    assert not (tmp_path / "x.png").exists()


# --- uploads: decompression bombs and masks ------------------------------------------------------


def real_bomb(width: int, height: int) -> str:
    """A valid PNG of width×height black pixels: kilobytes on the wire, megabytes decoded."""
    buffer = io.BytesIO()
    Image.new("L", (width, height), 0).save(buffer, format="PNG", optimize=False)
    return base64.b64encode(buffer.getvalue()).decode()


def test_a_decompression_bomb_is_refused_before_any_pixel_is_decoded(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    bomb = real_bomb(4000, 4000)  # 16 Mpixels (limit 1 Mpixel) in ~16 KB
    assert len(bomb) < 64 * 1024
    decoded: list[tuple[int, int]] = []
    original_load = ImageFile.ImageFile.load

    def counting_load(self: ImageFile.ImageFile) -> Any:
        decoded.append(self.size)
        return original_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    body = {"model": "tiny-ae", "images": [bomb]}
    assert_error(client.post("/encode", json=body, headers=auth(ALICE)), 413, "image_too_large")
    inpaint = {"model": "tiny-ddpm", "image": png_b64(), "mask": bomb, "seed": 1}
    err = assert_error(
        client.post("/inpaint", json=inpaint, headers=auth(ALICE)), 413, "image_too_large"
    )
    assert err["param"] == "mask"
    assert (4000, 4000) not in decoded  # Pillow's decoder never ran on the bomb
    # and a normal image does get decoded (the spies would have seen it)
    ok = client.post(
        "/encode", json={"model": "tiny-ae", "images": [png_b64()]}, headers=auth(ALICE)
    )
    assert ok.status_code == 202 and (8, 8) in decoded


def queued_mask(client: TestClient, job_id: str) -> Image.Image:
    conn = client.app.state.ddserve.connection
    request = Job.fetch(job_id, connection=conn).kwargs["request"]
    return Image.open(io.BytesIO(base64.b64decode(request["mask"])))


def test_masks_are_checked_and_made_binary(client: TestClient) -> None:
    body = {"model": "tiny-ddpm", "image": png_b64(), "seed": 1}

    def inpaint(mask: str) -> Any:
        return client.post("/inpaint", json={**body, "mask": mask}, headers=auth(ALICE))

    # a grey ramp 0..252 (anti-aliased edges): thresholded at 128, strictly 0/255 for the worker
    ramp = Image.new("L", (8, 8))
    ramp.putdata([4 * i for i in range(64)])
    buffer = io.BytesIO()
    ramp.save(buffer, format="PNG")
    r = inpaint(base64.b64encode(buffer.getvalue()).decode())
    assert r.status_code == 202, r.text
    mask = queued_mask(client, r.json()["id"])
    assert mask.mode == "L" and mask.size == (8, 8)
    assert list(mask.getdata()) == [255 if 4 * i >= 128 else 0 for i in range(64)]
    # an RGB mask is read as grey; a transparent one as white (keep)
    red = queued_mask(client, inpaint(png_b64(mode="RGB", value=(255, 0, 0))).json()["id"])
    assert set(red.getdata()) == {0}  # luma of pure red is 76 < 128: generate
    clear = queued_mask(client, inpaint(png_b64(mode="RGBA", value=(0, 0, 0, 0))).json()["id"])
    assert set(clear.getdata()) == {255}
    # wrong size, not a PNG, not base64, too many bytes: each named `mask`, nothing queued
    jpeg = io.BytesIO()
    Image.new("L", (8, 8)).save(jpeg, format="JPEG")
    cases = [
        (png_b64(8, 9), 422, "wrong_image_size"),
        (png_b64(16, 16), 422, "wrong_image_size"),
        (base64.b64encode(jpeg.getvalue()).decode(), 400, "invalid_image"),
        ("%%%", 400, "invalid_base64"),
        (base64.b64encode(b"\x89PNG" + b"\0" * (2 * 1024 * 1024)).decode(), 413, "image_too_large"),
    ]
    before = client.app.state.ddserve.connection.llen("rq:queue:sectest:tiny-ddpm")
    for mask_text, status, code in cases:
        assert_error(inpaint(mask_text), status, code, "mask")
    assert client.app.state.ddserve.connection.llen("rq:queue:sectest:tiny-ddpm") == before


@pytest.mark.parametrize(
    ("route", "body", "code", "param"),
    [
        ("/inpaint", {"n": 17}, "invalid_value", "n"),
        ("/inpaint", {"n": 0}, "invalid_value", "n"),
        ("/inpaint", {"jump_n_sample": 21}, "invalid_value", "jump_n_sample"),
        ("/inpaint", {"num_inference_steps": 101}, "too_many_steps", "num_inference_steps"),
        ("/inpaint", {"guidance_scale": -1}, "invalid_value", "guidance_scale"),
        ("/generate", {"model": "tiny-text", "prompt": "x" * 257}, "invalid_value", "prompt"),
        ("/generate", {"classifier_scale": 101}, "invalid_value", "classifier_scale"),
        ("/generate", {"num_inference_steps": 10**9}, "invalid_value", "num_inference_steps"),
        ("/generate", {"n": 10**12}, "invalid_value", "n"),
    ],
)
def test_inputs_out_of_range_name_their_field(
    client: TestClient, route: str, body: dict[str, Any], code: str, param: str
) -> None:
    base: dict[str, Any] = {"model": "tiny-ddpm", "class_label": 1, "seed": 1}
    if route == "/inpaint":
        base.update(image=png_b64(), mask=png_b64(value=0))
    if body.get("model") == "tiny-text":
        base.pop("class_label")
    answer = client.post(route, json={**base, **body}, headers=auth(ALICE))
    assert_error(answer, 422, code, param)


# --- limits kept in Redis: shared by every gateway process ---------------------------------------


def test_rate_limit_is_per_key_and_shared_by_gateway_processes(zoo: Path, tmp_path: Path) -> None:
    server = fakeredis.FakeServer()
    one = TestClient(gateway(zoo, tmp_path, server, rate_limit_per_minute=4))
    two = TestClient(gateway(zoo, tmp_path, server, rate_limit_per_minute=4))
    for client in (one, two, one, two):
        assert client.post("/generate", json=GEN, headers=auth(ALICE)).status_code == 202
    limited = two.post("/generate", json=GEN, headers=auth(ALICE))
    assert_error(limited, 429, "rate_limited")
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    assert_error(one.post("/generate", json=GEN, headers=auth(ALICE)), 429, "rate_limited")
    assert one.post("/generate", json=GEN, headers=auth(BOB)).status_code == 202  # per key


def test_rate_limit_window_and_retry_after() -> None:
    now = [120.0 + 45.5]  # 45.5 s into a minute
    limiter = RateLimiter(fakeredis.FakeRedis(), "rl", per_minute=2, clock=lambda: now[0])
    assert limiter.hit("a") is None and limiter.hit("a") is None
    assert limiter.hit("a") == 15  # ceil(60 − 45.5): the window's time left
    assert limiter.hit("b") is None
    now[0] = 180.0  # the next minute
    assert limiter.hit("a") is None
    assert RateLimiter(fakeredis.FakeRedis(), "rl", per_minute=0).hit("a") is None  # 0 = off


def test_queue_limit_is_shared_by_gateway_processes(zoo: Path, tmp_path: Path) -> None:
    server = fakeredis.FakeServer()
    one = TestClient(gateway(zoo, tmp_path, server, max_queue_length=3))
    two = TestClient(gateway(zoo, tmp_path, server, max_queue_length=3))
    for client in (one, two, one):
        assert client.post("/generate", json=GEN, headers=auth(ALICE)).status_code == 202
    full = two.post("/generate", json=GEN, headers=auth(BOB))
    assert_error(full, 429, "queue_full")
    assert int(full.headers["retry-after"]) > 0


def test_concurrent_submissions_never_overfill_a_queue_or_duplicate_a_job(
    zoo: Path, tmp_path: Path
) -> None:
    """Twelve requests at once through two gateway processes: the queue-length check and the
    Idempotency-Key claim are atomic in Redis, not read-then-write races."""
    server = fakeredis.FakeServer()
    gateways = [TestClient(gateway(zoo, tmp_path, server, max_queue_length=5)) for _ in range(2)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(
            pool.map(
                lambda i: gateways[i % 2].post("/generate", json=GEN, headers=auth(ALICE)),
                range(12),
            )
        )
    assert sorted(a.status_code for a in answers) == [202] * 5 + [429] * 7
    conn = gateways[0].app.state.ddserve.connection
    assert conn.llen("rq:queue:sectest:tiny-ddpm") == 5

    headers = {**auth(BOB), "Idempotency-Key": "same"}
    text = {"model": "tiny-text", "prompt": None, "seed": 3}  # another model's queue, not full
    with ThreadPoolExecutor(max_workers=6) as pool:
        replays = list(
            pool.map(
                lambda i: gateways[i % 2].post("/generate", json=text, headers=headers),
                range(6),
            )
        )
    assert {a.status_code for a in replays} == {202}
    assert len({a.json()["id"] for a in replays}) == 1


def test_idempotency_key_across_gateway_processes(zoo: Path, tmp_path: Path) -> None:
    server = fakeredis.FakeServer()
    one = TestClient(gateway(zoo, tmp_path, server))
    two = TestClient(gateway(zoo, tmp_path, server))
    headers = {**auth(ALICE), "Idempotency-Key": "retry-me"}
    first = one.post("/generate", json=GEN, headers=headers)
    again = two.post("/generate", json=GEN, headers=headers)  # a retry landing on another process
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"]
    conn = one.app.state.ddserve.connection
    assert conn.llen("rq:queue:sectest:tiny-ddpm") == 1  # one job, not two
    changed = two.post("/generate", json={**GEN, "seed": 2}, headers=headers)
    assert_error(changed, 422, "idempotency_key_reused", "Idempotency-Key")
    # the same key from another API key is another request, and never reveals Alice's job
    bobs = two.post("/generate", json=GEN, headers={**auth(BOB), "Idempotency-Key": "retry-me"})
    assert bobs.status_code == 202 and bobs.json()["id"] != first.json()["id"]
