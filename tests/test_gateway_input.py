"""Gateway input hardening (issue #18): hostile path ids, body sizes and validation errors that must
answer a clear 4xx, quickly, never a 500. fakeredis, no worker, no torch."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ddserve.storage import InvalidKeyError, validate_key
from service.logs import request_id_from
from tests.gateway_support import assert_error, make_app, write_config_zoo


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_config_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture
def client(zoo: Path, tmp_path: Path) -> Iterator[TestClient]:
    app, _ = make_app(zoo, tmp_path)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


# `$` matches before a final newline: these reached RQ, whose id check raised (a 500).
HOSTILE_IDS = ["abc%0a", "abc%0A", "abc%0d%0a", "a%0a%0a", "abc%00", "abc:def", "a_b", "a" * 65]


@pytest.mark.parametrize("job_id", HOSTILE_IDS)
def test_a_job_id_rq_would_refuse_is_a_404(client: TestClient, job_id: str) -> None:
    assert_error(client.get(f"/jobs/{job_id}"), 404, "job_not_found", "id")
    assert_error(client.post(f"/jobs/{job_id}/cancel"), 404, "job_not_found", "id")


@pytest.mark.parametrize("suffix", ["%0a", "%0d", "%00", "%0a%0a"])
def test_an_image_key_with_a_control_character_is_a_404(client: TestClient, suffix: str) -> None:
    r = client.get(f"/images/abc/0.png{suffix}", params={"expires": "1", "sig": "x"})
    assert r.status_code == 404, r.text
    # Starlette's `{key:path}` route does not match two final newlines: its own 404 then
    assert r.json()["error"]["code"] in {"image_not_found", "not_found"}


def test_storage_keys_and_request_ids_are_matched_whole() -> None:
    validate_key("abc/0.png")
    for key in ["abc/0.png\n", "abc\n/0.png", "abc/0.png\r\n"]:
        with pytest.raises(InvalidKeyError):
            validate_key(key)
    assert request_id_from("req-1") == "req-1"
    assert request_id_from("req-1\n") != "req-1\n"  # a fresh id, never the header's newline


def _deep_json(depth: int, leaf: str = "0.5") -> str:
    return "[" * depth + leaf + "]" * depth


@pytest.mark.parametrize("depth", [40, 600, 900])
@pytest.mark.parametrize(
    ("model", "field"), [("tiny-ae", "latents"), ("tiny-vq", "latents"), ("tiny-vq", "codes")]
)
def test_deeply_nested_latents_and_codes_are_a_422(
    client: TestClient, depth: int, model: str, field: str
) -> None:
    body = f'{{"model": "{model}", "{field}": {_deep_json(depth)}}}'
    r = client.post("/decode", content=body, headers={"content-type": "application/json"})
    assert_error(r, 422, "nesting_too_deep", field)
