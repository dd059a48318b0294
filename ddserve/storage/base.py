"""The storage interface that workers write images to and the gateway reads links from."""

from __future__ import annotations

from typing import Protocol, runtime_checkable


class StorageError(RuntimeError):
    """A backend failure (disk, network, credentials): not the client's fault."""


class ObjectNotFoundError(KeyError):
    """No object under this key (never written, or already expired)."""


@runtime_checkable
class Storage(Protocol):
    """An image store. Keys are validated by `ddserve.storage.keys.validate_key`.

    - `put(key, data, content_type)`: write (replace) one object.
    - `get(key)`: its bytes; ObjectNotFoundError if absent.
    - `url(key, base_url)`: a link a client can GET without an API key (local: HMAC-signed link to
      the gateway's `/images/{key}`; S3: a presigned GET URL).
    - `delete_expired(max_age_s)`: delete objects older than max_age_s; returns how many.
    - `serves_links`: True when the gateway must serve `/images/{key}` itself (local backend).
    """

    serves_links: bool

    def put(self, key: str, data: bytes, content_type: str) -> None: ...

    def get(self, key: str) -> bytes: ...

    def url(self, key: str, base_url: str) -> str: ...

    def verify_link(self, key: str, expires: str | None, sig: str | None) -> bool: ...

    def delete_expired(self, max_age_s: float) -> int: ...
