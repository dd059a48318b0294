"""Signed, expiring image links for the local backend.

A link is `{base_url}/images/{key}?expires=E&sig=S` with E a Unix time and
S = hex(HMAC-SHA256(secret, key + "\\n" + E)). The gateway recomputes S and compares in constant
time (`hmac.compare_digest`); a link is good until E. Nothing but the secret can forge one, and a
link for one key never opens another.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from urllib.parse import quote, urlencode


class LinkSigner:
    """Signs and verifies (key, expiry) pairs with one HMAC secret."""

    def __init__(self, secret: str, ttl_s: int, clock: Callable[[], float] = time.time) -> None:
        if not secret:
            raise ValueError("a link signer needs a non-empty secret")
        self._secret = secret.encode()
        self.ttl_s = ttl_s
        self._clock = clock

    def signature(self, key: str, expires: int) -> str:
        message = f"{key}\n{expires}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def sign(self, key: str, base_url: str) -> str:
        """The link to `key`, valid for `ttl_s` seconds from now."""
        expires = int(self._clock()) + self.ttl_s
        query = urlencode({"expires": expires, "sig": self.signature(key, expires)})
        return f"{base_url.rstrip('/')}/images/{quote(key)}?{query}"

    def verify(self, key: str, expires: int | str | None, sig: str | None) -> bool:
        """True if `sig` signs (key, expires) and `expires` is not past."""
        if expires is None or sig is None:
            return False
        try:
            expires_at = int(expires)
        except (TypeError, ValueError):
            return False
        if expires_at < self._clock():
            return False
        # Bytes, not str: compare_digest refuses non-ASCII str (a TypeError, i.e. a 500, for a
        # hostile `sig=%C3%A9`); any text encodes, so a bad signature is just a mismatch.
        presented = str(sig).encode("utf-8", "backslashreplace")
        return hmac.compare_digest(self.signature(key, expires_at).encode(), presented)
