"""Storage backends: key validation, signed links, atomic writes, expiry cleanup — locally and
against a real S3-compatible server (moto's server mode) started on a loopback port."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ddserve.settings import Settings
from ddserve.storage import (
    InvalidKeyError,
    ObjectNotFoundError,
    content_type_for,
    create_storage,
    image_key,
    trajectory_key,
    validate_key,
)
from ddserve.storage.local import LocalStorage
from ddserve.storage.signing import LinkSigner

PNG = b"\x89PNG\r\n\x1a\n" + b"x" * 32


@pytest.mark.parametrize(
    "key",
    ["../etc/passwd", "/abs", "a/../b", "a//b", "", ".hidden", "a/.", "a\\b", "a/b/", "é.png"],
)
def test_bad_keys_are_rejected(key: str) -> None:
    with pytest.raises(InvalidKeyError):
        validate_key(key)


def test_key_helpers() -> None:
    assert image_key("abc-123", 3) == "abc-123/3.png"
    assert trajectory_key("abc-123") == "abc-123/trajectory.gif"
    assert content_type_for("j/0.png") == "image/png"
    assert content_type_for("j/trajectory.gif") == "image/gif"
    assert content_type_for("j/x.bin") == "application/octet-stream"


def test_signer_roundtrip_expiry_and_tamper() -> None:
    now = [1000.0]
    signer = LinkSigner("s3cret", ttl_s=60, clock=lambda: now[0])
    url = signer.sign("job/0.png", "http://h:1/")
    assert url.startswith("http://h:1/images/job/0.png?expires=1060&sig=")
    sig = url.split("sig=")[1]
    assert signer.verify("job/0.png", "1060", sig)
    assert not signer.verify("job/1.png", "1060", sig)  # another key
    assert not signer.verify("job/0.png", "1061", sig)  # a longer life
    assert not signer.verify("job/0.png", "1060", sig[:-1] + ("0" if sig[-1] != "0" else "1"))
    assert not signer.verify("job/0.png", "x", sig)
    assert not signer.verify("job/0.png", None, sig)
    assert not LinkSigner("other", 60, clock=lambda: now[0]).verify("job/0.png", "1060", sig)
    now[0] = 1061.0
    assert not signer.verify("job/0.png", "1060", sig)  # expired


def test_local_put_get_and_cleanup(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path / "images", "k", link_ttl_s=60)
    store.put("j1/0.png", PNG, "image/png")
    store.put("j2/0.png", PNG + b"2", "image/png")
    assert store.get("j1/0.png") == PNG
    assert not list((tmp_path / "images" / "j1").glob(".tmp-*"))  # temp file renamed away
    with pytest.raises(ObjectNotFoundError):
        store.get("j1/9.png")
    with pytest.raises(InvalidKeyError):
        store.put("../x.png", PNG, "image/png")
    old = time.time() - 1000
    os.utime(tmp_path / "images" / "j1" / "0.png", (old, old))
    os.utime(tmp_path / "images" / "j1", (old, old))
    assert store.delete_expired(500) == 1
    assert not (tmp_path / "images" / "j1").exists()  # the emptied folder goes too
    assert store.get("j2/0.png") == PNG + b"2"
    assert store.delete_expired(500) == 0


def test_create_storage_local_fills_a_random_secret(tmp_path: Path) -> None:
    settings = Settings(storage_dir=tmp_path, signing_secret="")
    store = create_storage(settings)
    assert settings.signing_secret  # shared with whoever holds the same Settings
    url = store.url("j/0.png", "http://x")
    expires, sig = url.split("?")[1].replace("expires=", "").split("&sig=")
    assert create_storage(settings).verify_link("j/0.png", expires, sig)


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def test_s3_put_get_presigned_and_cleanup(moto_endpoint: str) -> None:
    settings = Settings(
        storage="s3",
        s3_endpoint_url=moto_endpoint,
        s3_bucket="test-images",
        s3_access_key_id="testing",
        s3_secret_access_key="testing",
        link_ttl_s=120,
    )
    store = create_storage(settings)
    assert not store.serves_links
    store.put("j1/0.png", PNG, "image/png")
    assert store.get("j1/0.png") == PNG
    with pytest.raises(ObjectNotFoundError):
        store.get("j1/5.png")
    url = store.url("j1/0.png", "http://ignored")
    assert "X-Amz-Signature=" in url and "X-Amz-Expires=120" in url
    answer = httpx.get(url)
    assert answer.status_code == 200 and answer.content == PNG
    assert answer.headers["content-type"] == "image/png"
    assert create_storage(settings).get("j1/0.png") == PNG  # existing bucket is reused
    assert store.delete_expired(3600) == 0
    assert store.delete_expired(-60) == 1  # every object is older than "60 s in the future"
    with pytest.raises(ObjectNotFoundError):
        store.get("j1/0.png")


def test_local_put_makes_missing_folders_overwrites_and_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStorage(tmp_path / "images", "k", link_ttl_s=60)
    store.put("j1/0.png", PNG, "image/png")
    shutil.rmtree(tmp_path / "images" / "j1")  # a cleanup removed the job's folder meanwhile
    store.put("j1/1.png", PNG, "image/png")
    store.put("j1/1.png", PNG + b"new", "image/png")
    assert store.get("j1/1.png") == PNG + b"new"
    assert sorted(p.name for p in (tmp_path / "images" / "j1").iterdir()) == ["1.png"]

    def refuse(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        store.put("j1/2.png", PNG, "image/png")
    assert sorted(p.name for p in (tmp_path / "images" / "j1").iterdir()) == ["1.png"]
