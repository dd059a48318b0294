"""Images in S3-compatible object storage (AWS S3, MinIO, moto), handed out as presigned GETs."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from ddserve.storage.base import ObjectNotFoundError, StorageError
from ddserve.storage.keys import validate_key


class S3Storage:
    """One bucket; the object key is the storage key. The bucket is created if it does not exist
    (a credential without CreateBucket works with an existing bucket)."""

    serves_links = False

    def __init__(
        self,
        bucket: str,
        link_ttl_s: int,
        *,
        endpoint_url: str | None = None,
        public_endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        client: Any = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.link_ttl_s = link_ttl_s
        self._clock = clock

        def make_client(endpoint: str | None) -> Any:
            return boto3.client(
                "s3",
                endpoint_url=endpoint,
                region_name=region,
                aws_access_key_id=access_key_id,
                aws_secret_access_key=secret_access_key,
                config=Config(signature_version="s3v4", retries={"max_attempts": 3}),
            )

        self.client = client or make_client(endpoint_url)
        # A presigned URL signs its host: links for clients are made by a client of the address the
        # clients use (presigning is local, this client never connects).
        self._link_client = make_client(public_endpoint_url) if public_endpoint_url else self.client
        self._ensure_bucket(region)

    def _ensure_bucket(self, region: str) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in {"404", "NoSuchBucket", "NotFound"}:
                raise StorageError(f"cannot reach bucket {self.bucket!r}: {e}") from e
        params: dict[str, Any] = {"Bucket": self.bucket}
        if region != "us-east-1":  # us-east-1 rejects an explicit location constraint
            params["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self.client.create_bucket(**params)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
                raise StorageError(f"cannot create bucket {self.bucket!r}: {e}") from e

    def put(self, key: str, data: bytes, content_type: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.put_object(
                Bucket=self.bucket, Key=validate_key(key), Body=data, ContentType=content_type
            )
        except (BotoCoreError, ClientError) as e:
            raise StorageError(f"cannot write {key!r}: {e}") from e

    def get(self, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=validate_key(key))
            return answer["Body"].read()
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in {"NoSuchKey", "404"}:
                raise ObjectNotFoundError(key) from e
            raise StorageError(f"cannot read {key!r}: {e}") from e
        except BotoCoreError as e:
            raise StorageError(f"cannot read {key!r}: {e}") from e

    def url(self, key: str, base_url: str) -> str:
        """A presigned GET, valid `link_ttl_s` seconds, naming the public endpoint when one is set
        (base_url is not used: S3 serves it)."""
        return self._link_client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": validate_key(key)},
            ExpiresIn=self.link_ttl_s,
        )

    def verify_link(self, key: str, expires: str | None, sig: str | None) -> bool:
        return False  # S3 checks its own presigned links; the gateway serves none

    def delete_expired(self, max_age_s: float) -> int:
        """Delete objects whose LastModified is more than max_age_s ago (1000 per request)."""
        cutoff = datetime.fromtimestamp(self._clock() - max_age_s, tz=UTC)
        deleted = 0
        batch: list[dict[str, str]] = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket):
            for obj in page.get("Contents", []):
                if obj["LastModified"] < cutoff:
                    batch.append({"Key": obj["Key"]})
                if len(batch) == 1000:
                    deleted += self._delete(batch)
                    batch = []
        if batch:
            deleted += self._delete(batch)
        return deleted

    def _delete(self, batch: list[dict[str, str]]) -> int:
        answer = self.client.delete_objects(
            Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
        )
        return len(batch) - len(answer.get("Errors", []))
