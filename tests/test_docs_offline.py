"""`/docs` (Swagger UI) and `/redoc` work without the internet: every URL their pages load is one of
the gateway's own, and each of them answers 200 — with auth on, since a browser sends no API key.
FastAPI's own pages load their JavaScript and CSS from a CDN and render blank offline."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.gateway_support import make_app, write_config_zoo

# Whatever a page loads: src/href attributes, Swagger UI's `url:` and ReDoc's `spec-url`.
LOADED = re.compile(r"""(?:src|href|spec-url)\s*=\s*"([^"]*)"|\burl:\s*'([^']*)'""")


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    root: Path = tmp_path_factory.mktemp("docs")
    app, _ = make_app(write_config_zoo(root / "zoo"), root, auth_enabled=True, api_keys="")
    with TestClient(app) as c:
        yield c


def loaded_urls(html: str) -> list[str]:
    return [a or b for a, b in LOADED.findall(html)]


@pytest.mark.parametrize(
    ("page", "assets"),
    [
        ("/docs", {"swagger-ui-bundle.js", "swagger-ui.css", "favicon.png"}),
        ("/redoc", {"redoc.standalone.js", "favicon.png"}),
    ],
)
def test_docs_pages_load_only_local_urls_and_each_is_served(
    client: TestClient, page: str, assets: set[str]
) -> None:
    answer = client.get(page)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/html")
    html = answer.text
    assert "://" not in html and "fonts.googleapis" not in html  # no CDN, no web fonts
    urls = loaded_urls(html)
    assert "/openapi.json" in urls
    assert {url.rsplit("/", 1)[-1] for url in urls} >= assets
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), url
        fetched = client.get(url)
        assert fetched.status_code == 200, url
        assert len(fetched.content) > 100, url
    kinds = {url.rsplit(".", 1)[-1]: client.get(url).headers["content-type"] for url in urls}
    assert "javascript" in kinds["js"]
    if "css" in kinds:
        assert kinds["css"].startswith("text/css")


def test_swagger_ui_makes_no_online_call_of_its_own(client: TestClient) -> None:
    html = client.get("/docs").text
    assert (
        '"validatorUrl": null' in html
    )  # Swagger UI's default posts the spec to an online validator
    assert client.get("/docs/oauth2-redirect").status_code == 200
