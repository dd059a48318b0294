"""Image links name the store's public address (`DDSERVE_S3_PUBLIC_URL`) when clients reach it by
another address than the workers, as with MinIO in docker compose (`http://minio:9000` inside the
compose network, `http://localhost:9000` from the host). Checked against moto's S3 server, reached
as `localhost` by the storage and as `127.0.0.1` by the client."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from ddserve.settings import Settings
from ddserve.storage import create_storage

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16


@pytest.fixture(scope="module")
def moto_port() -> Iterator[int]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    yield server.get_host_and_port()[1]
    server.stop()


def _settings(port: int, public_url: str | None) -> Settings:
    return Settings(
        storage="s3",
        s3_endpoint_url=f"http://localhost:{port}",
        s3_public_url=public_url,
        s3_bucket="public-url-images",
        s3_access_key_id="testing",
        s3_secret_access_key="testing",
        link_ttl_s=60,
    )


def test_links_name_the_public_endpoint_and_open(moto_port: int) -> None:
    public = f"http://127.0.0.1:{moto_port}"
    store = create_storage(_settings(moto_port, public))
    store.put("job-1/0.png", PNG, "image/png")
    url = store.url("job-1/0.png", "http://ignored")
    assert url.startswith(f"{public}/public-url-images/job-1/0.png?")
    answer = httpx.get(url)  # the signature covers the public host: S3 accepts it there
    assert answer.status_code == 200 and answer.content == PNG


def test_without_a_public_url_links_name_the_endpoint(moto_port: int) -> None:
    store = create_storage(_settings(moto_port, None))
    assert store.url("job-1/0.png", "http://ignored").startswith(f"http://localhost:{moto_port}/")
