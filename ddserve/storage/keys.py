"""Storage keys: how images are named in every backend, and the check that keeps a key inside it.

A key is a relative, `/`-separated path of safe segments: `{job_id}/{index}.png`,
`{job_id}/trajectory.gif`. Every segment starts with a letter or digit, so `.`, `..`, hidden files,
absolute paths and backslashes can never appear; the local backend can therefore join a valid key
to its root without escaping it.
"""

from __future__ import annotations

import re

MAX_KEY_LENGTH = 512
_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}"
_KEY = re.compile(rf"{_SEGMENT}(?:/{_SEGMENT}){{0,7}}")  # fullmatch: `$` allows a final "\n"

CONTENT_TYPES = {
    ".png": "image/png",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".json": "application/json",
}


class InvalidKeyError(ValueError):
    """A key that is not of the form segment[/segment...] with safe characters."""


def validate_key(key: str) -> str:
    """Return `key` unchanged if it is a safe storage key, else raise InvalidKeyError."""
    if not isinstance(key, str) or len(key) > MAX_KEY_LENGTH or not _KEY.fullmatch(key):
        raise InvalidKeyError(f"invalid storage key {key!r}")
    if any(segment in {".", ".."} for segment in key.split("/")):  # unreachable by the regex
        raise InvalidKeyError(f"invalid storage key {key!r}")
    return key


def image_key(job_id: str, index: int, extension: str = "png") -> str:
    """Key of image `index` of a job: `{job_id}/{index}.png` (or .jpeg, .webp)."""
    return validate_key(f"{job_id}/{index}.{extension}")


def trajectory_key(job_id: str, extension: str = "gif") -> str:
    """Key of a job's x_t animation: `{job_id}/trajectory.gif` (or .webp)."""
    return validate_key(f"{job_id}/trajectory.{extension}")


def content_type_for(key: str) -> str:
    """MIME type from the key's extension (application/octet-stream when unknown)."""
    dot = key.rfind(".")
    return (
        CONTENT_TYPES.get(key[dot:].lower(), "application/octet-stream")
        if dot >= 0
        else ("application/octet-stream")
    )
