"""Image storage backends: where workers write PNG/GIF outputs and how clients get them back.

`create_storage(settings)` picks the backend from `settings.storage`:
- `local` (default): files under `settings.storage_dir`; links are HMAC-signed, expiring
  `{base_url}/images/{key}?expires=..&sig=..` served by the gateway;
- `s3`: an S3-compatible bucket through boto3; links are presigned GETs.
"""

from __future__ import annotations

import logging
import secrets

from ddserve.settings import Settings
from ddserve.storage.base import ObjectNotFoundError, Storage, StorageError
from ddserve.storage.keys import (
    InvalidKeyError,
    content_type_for,
    image_key,
    trajectory_key,
    validate_key,
)

__all__ = [
    "InvalidKeyError",
    "ObjectNotFoundError",
    "Storage",
    "StorageError",
    "content_type_for",
    "create_storage",
    "ensure_signing_secret",
    "image_key",
    "trajectory_key",
    "validate_key",
]

log = logging.getLogger(__name__)


def ensure_signing_secret(settings: Settings) -> Settings:
    """Fill an empty `signing_secret` with a random one (in place) and return the settings.

    Links signed with a random secret verify only in processes that share this Settings object (or
    inherit it through the environment), e.g. the embedded mode's gateway and worker thread.
    """
    if not settings.signing_secret:
        settings.signing_secret = secrets.token_urlsafe(32)
        log.info("no DDSERVE_SIGNING_SECRET set: image links use a random secret for this run")
    return settings


def create_storage(settings: Settings) -> Storage:
    """The backend `settings.storage` names, configured from settings."""
    if settings.storage == "s3":
        from ddserve.storage.s3 import S3Storage

        return S3Storage(
            settings.s3_bucket,
            settings.link_ttl_s,
            endpoint_url=settings.s3_endpoint_url,
            public_endpoint_url=settings.s3_public_url,
            region=settings.s3_region,
            access_key_id=settings.s3_access_key_id,
            secret_access_key=settings.s3_secret_access_key,
        )
    from ddserve.storage.local import LocalStorage

    ensure_signing_secret(settings)
    return LocalStorage(settings.storage_dir, settings.signing_secret, settings.link_ttl_s)
