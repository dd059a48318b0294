"""Images in a local directory, served by the gateway through signed, expiring links."""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from ddserve.storage.base import ObjectNotFoundError, StorageError
from ddserve.storage.keys import validate_key
from ddserve.storage.signing import LinkSigner


class LocalStorage:
    """Objects are files `root/<key>`; writes are atomic (temporary file + rename) so a reader
    never sees half an image.

    A put costs three system calls (create, write, rename; a fourth, mkdir, for a job's first
    image): the worker stores every finished image, so paths are built without touching the file
    system (no `resolve`) and folders are made only when the create finds none."""

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
        # validate_key forbids ".", "..", absolute paths and backslashes; normpath (no system call)
        # and the prefix check are defence in depth. The root itself was resolved once.
        path = Path(os.path.normpath(os.path.join(self.root, validate_key(key))))
        if not path.is_relative_to(self.root):
            raise StorageError(f"key {key!r} escapes the storage root")
        return path

    def put(self, key: str, data: bytes, content_type: str) -> None:
        path = self._path(key)
        tmp = path.parent / f".tmp-{uuid.uuid4().hex}"  # hidden: never a valid key
        for attempt in range(3):
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                break
            except FileNotFoundError:  # the job's first image, or delete_expired removed it
                if attempt == 2:
                    raise
                path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
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
