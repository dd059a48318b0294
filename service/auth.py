"""API keys: `Authorization: Bearer <key>` checked against SHA-256 hashes.

Keys are never stored, only their SHA-256 hex digests, from `DDSERVE_API_KEYS` (comma-separated)
and `DDSERVE_API_KEYS_FILE` (one per line, `#` comments). An entry is `hash` or `name:hash`; the
name (or the hash's first 16 hex digits) is the key's id, recorded as the owner of its jobs. A
presented key is hashed and compared with every stored hash by `hmac.compare_digest` (constant time
per comparison, and no early exit), so timing reveals neither which hash matched nor how much of it.
Make a hash with `printf %s "$KEY" | sha256sum`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class KeyConfigError(ValueError):
    """A malformed key entry (the message never contains the entry itself beyond its name)."""


@dataclass(frozen=True)
class ApiKey:
    id: str
    digest: bytes  # the 32-byte SHA-256 of the key


def _parse_entry(entry: str, where: str) -> ApiKey:
    name, _, digest = entry.rpartition(":")
    digest = digest.strip().lower()
    if not _HEX64.match(digest):
        raise KeyConfigError(
            f"{where}: an API key entry must be a SHA-256 hex digest (64 hex digits) or name:digest"
        )
    key_id = name.strip() or digest[:16]
    return ApiKey(id=key_id, digest=bytes.fromhex(digest))


def load_keys(api_keys: str, api_keys_file: Path | None) -> list[ApiKey]:
    """Every configured key (duplicates by digest kept once)."""
    entries = [(e.strip(), "DDSERVE_API_KEYS") for e in api_keys.split(",") if e.strip()]
    if api_keys_file is not None:
        for number, line in enumerate(Path(api_keys_file).read_text().splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if line:
                entries.append((line, f"{api_keys_file}:{number}"))
    keys: dict[bytes, ApiKey] = {}
    for entry, where in entries:
        key = _parse_entry(entry, where)
        keys.setdefault(key.digest, key)
    return list(keys.values())


def hash_key(key: str) -> str:
    """The hex SHA-256 to configure for `key`."""
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    """Looks up the key id of a presented bearer token."""

    def __init__(self, keys: list[ApiKey]) -> None:
        self._keys = list(keys)

    def __len__(self) -> int:
        return len(self._keys)

    def identify(self, token: str) -> str | None:
        """The id of the key whose hash matches `token`, else None; every stored hash is compared."""
        digest = hashlib.sha256(token.encode()).digest()
        found: str | None = None
        for key in self._keys:
            if hmac.compare_digest(digest, key.digest):
                found = key.id
        return found


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
