"""The blob store in an S3-compatible bucket (AWS S3, MinIO, Ceph RGW, moto's server...).

``LABQ_STORAGE=s3`` with ``LABQ_S3_BUCKET`` (which must exist), ``LABQ_S3_ENDPOINT_URL``
(empty: AWS) and ``LABQ_S3_PREFIX``; credentials and region come from the standard AWS
variables as boto3 reads them (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, ``AWS_DEFAULT_REGION``). Needs the ``s3`` extra.

An object appears whole or not at all (one PUT, or a multipart upload that becomes
visible when completed), so readers never see half of one. labq records the sha256 of
what it stored in the object's metadata (``x-amz-meta-sha256``) for receipts, but every
integrity check hashes the content itself: not every S3-compatible server keeps or checks
its own checksums. Bodies are read in chunks as they arrive, never whole.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from labq.shared.blobstore import (
    CHUNK,
    Blob,
    BlobInfo,
    BlobKeyError,
    BlobStore,
    StorageUnavailableError,
    check_key,
    check_prefix,
    expect_sha256,
    file_digest,
)
from labq.shared.errors import ConfigError, LabqError

#: Error codes that mean "no such object" (HEAD answers carry no body, hence "404").
MISSING = {"NoSuchKey", "404", "NotFound"}
DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403",
          "InvalidToken", "ExpiredToken"}
MAX_KEY_BYTES = 1024


def normalise_prefix(prefix: str) -> str:
    prefix = prefix.strip().strip("/")
    if not prefix:
        return ""
    check_key(prefix)
    return prefix + "/"


class S3BlobStore(BlobStore):
    """Blobs as objects ``<prefix><key>`` of one bucket; ``client`` is a boto3 S3 client."""

    kind = "s3"

    def __init__(self, client: Any, bucket: str, prefix: str = "", endpoint: str = "",
                 transfer: Any = None) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = normalise_prefix(prefix)
        self.endpoint = endpoint
        self.transfer = transfer

    @classmethod
    def from_settings(cls, settings: Any) -> S3BlobStore:
        try:
            import boto3
            from boto3.s3.transfer import TransferConfig
            from botocore.config import Config
        except ImportError:
            raise ConfigError("LABQ_STORAGE=s3 needs boto3, which is not installed: "
                              "pip install 'labq[s3]' (or set LABQ_STORAGE=volume)") from None
        if not settings.s3_bucket:
            raise ConfigError("LABQ_STORAGE=s3 needs LABQ_S3_BUCKET, the name of a bucket "
                              "that exists")
        # botocore says at INFO where it found credentials, for every client: noise.
        logging.getLogger("botocore").setLevel(max(logging.WARNING,
                                                   logging.getLogger().getEffectiveLevel()))
        endpoint = settings.s3_endpoint_url.strip()
        config = Config(
            retries={"max_attempts": 5, "mode": "standard"},
            connect_timeout=5, read_timeout=60,
            # Every backend thread may stream a result at once.
            max_pool_connections=max(10, settings.backend_threads),
            # Own endpoints (MinIO, Ceph) rarely have a DNS name per bucket.
            s3={"addressing_style": "path"} if endpoint else {})
        client = boto3.session.Session().client("s3", endpoint_url=endpoint or None,
                                                config=config)
        # Parts of 16 MiB, 4 at a time: an upload holds at most ~64 MiB in flight.
        transfer = TransferConfig(multipart_threshold=64 * 1024 * 1024,
                                  multipart_chunksize=16 * 1024 * 1024, max_concurrency=4)
        return cls(client, settings.s3_bucket, settings.s3_prefix, endpoint, transfer)

    def describe(self) -> str:
        return f"the bucket {self.bucket!r} at {self.endpoint or 'AWS S3'}"

    # -- errors ----------------------------------------------------------------------
    def _failure(self, exc: Exception) -> LabqError:
        """What went wrong, in words that say what to fix."""
        from botocore.exceptions import ClientError, NoCredentialsError

        where = self.describe()
        if isinstance(exc, NoCredentialsError):
            return StorageUnavailableError(
                f"labq has no credentials for {where}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in labq's environment")
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            if code == "NoSuchBucket":
                return StorageUnavailableError(
                    f"{where} does not exist: create the bucket, or fix LABQ_S3_BUCKET")
            if code in DENIED:
                return StorageUnavailableError(
                    f"{where} refused labq's credentials ({code}): check "
                    "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY and the bucket's policy")
            return StorageUnavailableError(
                f"{where} answered {code}: {error.get('Message', '')}; check the store")
        return StorageUnavailableError(
            f"{where} did not answer ({exc}); check LABQ_S3_ENDPOINT_URL and that the "
            "object store is up")

    def _errors(self) -> tuple[type[BaseException], ...]:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        return (BotoCoreError, ClientError, Boto3Error)

    @staticmethod
    def _missing(exc: BaseException) -> bool:
        response = getattr(exc, "response", None) or {}
        return str(response.get("Error", {}).get("Code", "")) in MISSING

    def _name(self, key: str) -> str:
        check_key(key)
        return self.prefix + key

    # -- the contract ------------------------------------------------------------------
    def check(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except self._errors() as exc:
            if self._missing(exc):
                raise StorageUnavailableError(
                    f"{self.describe()} does not exist: create the bucket, or fix "
                    "LABQ_S3_BUCKET") from None
            raise self._failure(exc) from None

    def put(self, key: str, source: Path | BinaryIO, *, sha256: str | None = None,
            move: bool = False) -> BlobInfo:
        name = self._name(key)
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in key) \
                or len(name.encode()) > MAX_KEY_BYTES:
            raise BlobKeyError(f"{key!r} cannot be a key in {self.describe()}: S3 names hold "
                               f"no control characters and at most {MAX_KEY_BYTES} bytes")
        if not isinstance(source, Path):
            # Spooled to local disk first: a stream whose sha256 turns out wrong must not
            # replace what the key holds, and the metadata carries the real sha256.
            with tempfile.TemporaryDirectory(prefix="labq-put-") as tmp:
                spooled = Path(tmp) / "blob"
                with open(spooled, "wb") as out:
                    shutil.copyfileobj(source, out, CHUNK)
                return self.put(key, spooled, sha256=sha256)
        if move and sha256 is not None:
            # A file handed over with its hash just taken by labq (a staged upload):
            # not read twice, as on the volume (BlobStore.put).
            actual, size = sha256, source.stat().st_size
        else:
            actual, size = file_digest(source)
            expect_sha256(key, sha256, actual)
        try:
            self.client.upload_file(str(source), self.bucket, name,
                                    ExtraArgs={"Metadata": {"sha256": actual}},
                                    Config=self.transfer)
        except self._errors() as exc:
            raise self._failure(exc) from None
        if move:
            source.unlink(missing_ok=True)
        return BlobInfo(key, size, actual)

    def open(self, key: str) -> Blob | None:
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self._name(key))
        except self._errors() as exc:
            if self._missing(exc):
                return None
            raise self._failure(exc) from None
        sha = (answer.get("Metadata") or {}).get("sha256")
        return Blob(BlobInfo(key, int(answer["ContentLength"]), sha), answer["Body"])

    def info(self, key: str) -> BlobInfo | None:
        try:
            answer = self.client.head_object(Bucket=self.bucket, Key=self._name(key))
        except self._errors() as exc:
            if self._missing(exc):
                return None
            raise self._failure(exc) from None
        sha = (answer.get("Metadata") or {}).get("sha256")
        return BlobInfo(key, int(answer["ContentLength"]), sha)

    def list(self, prefix: str) -> Iterator[BlobInfo]:
        check_prefix(prefix)
        return self._pages(prefix, {})

    def has_any(self, prefix: str) -> bool:
        check_prefix(prefix)
        return next(self._pages(prefix, {"MaxItems": 1}), None) is not None

    def _pages(self, prefix: str, limits: dict[str, int]) -> Iterator[BlobInfo]:
        start = len(self.prefix)
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + prefix, PaginationConfig=limits)
        try:
            for page in pages:
                for item in page.get("Contents", []):
                    yield BlobInfo(item["Key"][start:], int(item["Size"]))
        except self._errors() as exc:
            raise self._failure(exc) from None

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._name(key))
        except self._errors() as exc:
            if not self._missing(exc):
                raise self._failure(exc) from None
