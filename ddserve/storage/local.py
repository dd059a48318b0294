"""Images in a local directory, served by the gateway through signed, expiring links."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ddserve.storage.base import ObjectNotFoundError, StorageError
from ddserve.storage.keys import validate_key
from ddserve.storage.signing import LinkSigner


class LocalStorage:
    """Objects are files `root/<key>`; writes are atomic (temporary file + rename) so a reader
    never sees half an image."""

    serves_links = True

    def __init__(
        self,
        root: Path,
        signing_secret: str,
        link_ttl_s: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.signer = LinkSigner(signing_secret, link_ttl_s, clock)
        self._clock = clock

    def _path(self, key: str) -> Path:
        path = (self.root / validate_key(key)).resolve()
        if not path.is_relative_to(self.root):  # defence in depth: validate_key already forbids it
            raise StorageError(f"key {key!r} escapes the storage root")
        return path

    def put(self, key: str, data: bytes, content_type: str) -> None:
        path = self._path(key)
        for attempt in range(3):  # a concurrent delete_expired may remove an empty folder
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
            raise ObjectNotFoundError(key) from e

    def url(self, key: str, base_url: str) -> str:
        return self.signer.sign(validate_key(key), base_url)

    def verify_link(self, key: str, expires: str | None, sig: str | None) -> bool:
        return self.signer.verify(key, expires, sig)

    def delete_expired(self, max_age_s: float) -> int:
        """Delete files modified more than max_age_s ago, then the folders left empty."""
        cutoff = self._clock() - max_age_s
        deleted = 0
        for dirpath, _subdirs, filenames in os.walk(self.root, topdown=False):
            folder = Path(dirpath)
            try:
                folder_mtime = folder.stat().st_mtime  # before our own unlinks touch it
            except FileNotFoundError:
                continue
            for name in filenames:
                path = folder / name
                try:
                    if path.stat().st_mtime < cutoff:
                        path.unlink()
                        deleted += 1
                except FileNotFoundError:  # a concurrent cleanup got there first
                    continue
            # An old, empty folder only: a fresh one may be about to receive a put.
            if folder != self.root and folder_mtime < cutoff:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # fails unless empty
        return deleted
