"""The store for bytes: trial artifacts, pause checkpoints, uploaded data sets and base models.

One interface (`Store`), two implementations: `LocalStore`, a folder on the server's disk (or a shared
mount; the default), and `S3Store`, S3-compatible object storage (AWS S3, MinIO, Ceph, R2 ...). Objects are
addressed by a key, a relative POSIX path (`12/345/adapter/adapter_model.safetensors`,
`datasets/<sha256>.tar`); the tables hold the keys, never where the store keeps them.

Nothing here reads a whole object into memory: a new object arrives as a finished local file (the upload
was streamed to `incoming()` first, so its size and SHA-256 are checked before it is stored), and reads are
chunk iterators the API streams to the client. Workers never talk to the store: they download through the
server's API, so they need no object-storage credentials.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from tunefleet.service.errors import StoreUnavailable

if TYPE_CHECKING:
    from tunefleet.service.config import Settings

__all__ = ["CHUNK_BYTES", "LocalStore", "S3Store", "Store", "open_store"]

CHUNK_BYTES = 1 << 20


class Store(ABC):
    """Objects under keys. `put` replaces an object of the same key; the others never raise for a missing
    key except `chunks` (FileNotFoundError). A store that fails otherwise raises StoreUnavailable (503)."""

    def __init__(self, spool: Path):
        self.spool = spool

    def incoming(self) -> tuple[int, Path]:
        """A temp file (open descriptor and path) to stream an upload into before `put`; on the local store's
        own filesystem, so that `put` is one atomic rename there."""
        self.spool.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.spool, prefix="upload-")
        return fd, Path(tmp)

    @abstractmethod
    def put(self, key: str, source: Path) -> None:
        """Store the local file `source` under `key` (moved or uploaded; `source` is gone afterwards or left for
        the caller to delete)."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def chunks(self, key: str) -> Iterator[bytes]:
        """The object's bytes in chunks of about CHUNK_BYTES; FileNotFoundError when there is none."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete one object; nothing happens when there is none."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Delete every object under the folder `prefix` (which ends with `/`)."""

    @abstractmethod
    def describe(self) -> str:
        """Where the objects are, for logs and errors."""


class LocalStore(Store):
    """Objects as files under `root` (the key is the relative path). A key that is an absolute path (an
    artifact recorded before keys existed) is the file itself."""

    def __init__(self, root: Path):
        super().__init__(root / ".incoming")
        self.root = root

    def path(self, key: str) -> Path:
        return self.root / key

    def put(self, key: str, source: Path) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, path)

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def chunks(self, key: str) -> Iterator[bytes]:
        fh = self.path(key).open("rb")  # FileNotFoundError before the first chunk is asked for
        return _read_chunks(fh)

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self.path(prefix), ignore_errors=True)

    def describe(self) -> str:
        return str(self.root)


def _read_chunks(fh: Any) -> Iterator[bytes]:
    with fh:
        while chunk := fh.read(CHUNK_BYTES):
            yield chunk


class S3Store(Store):
    """Objects in an S3 bucket under a prefix (`s3://bucket/prefix`), through boto3: uploads are multipart and
    streamed from the spool file, reads stream the object's body. Credentials come from boto3's usual chain
    (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile, an instance role); `endpoint_url` points it at
    another S3-compatible service."""

    def __init__(self, url: str, *, endpoint_url: str | None, region: str | None, spool: Path):
        import boto3
        from botocore.config import Config

        super().__init__(spool)
        parsed = urlparse(url)
        self.bucket, self.prefix = parsed.netloc, parsed.path.strip("/")
        self.url = url
        # A few quick retries: a request waits on the store, and an unreachable one should be a 503 in seconds.
        config = Config(retries={"mode": "standard", "max_attempts": 3}, connect_timeout=5, read_timeout=60)
        self.client = boto3.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextlib.contextmanager
    def _answering(self, key: str) -> Iterator[None]:
        """FileNotFoundError for a missing object; StoreUnavailable (503) for every other failure of the store
        (unreachable, no bucket, credentials refused), naming the settings to check."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(f"{self.url}/{key}") from None
            raise self._unavailable(exc) from exc
        except (BotoCoreError, Boto3Error) as exc:
            raise self._unavailable(exc) from exc

    def _unavailable(self, exc: Exception) -> StoreUnavailable:
        return StoreUnavailable(f"the object store {self.url} failed: {type(exc).__name__}: {exc}; check "
                                "TUNEFLEET_STORE_URL, TUNEFLEET_STORE_ENDPOINT_URL and the server's AWS credentials")

    def put(self, key: str, source: Path) -> None:
        with self._answering(key):
            self.client.upload_file(str(source), self.bucket, self._key(key))
        source.unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        try:
            with self._answering(key):
                self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except FileNotFoundError:
            return False
        return True

    def chunks(self, key: str) -> Iterator[bytes]:
        with self._answering(key):
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        return _read_chunks(body)

    def delete(self, key: str) -> None:
        with self._answering(key):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def delete_prefix(self, prefix: str) -> None:
        with self._answering(prefix):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                          Prefix=self._key(prefix))
            for page in pages:  # at most 1,000 keys a page, as delete_objects takes
                keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
                if keys:
                    self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})

    def describe(self) -> str:
        return self.url


def open_store(settings: Settings) -> Store:
    """The store the settings name: `store_url` s3://bucket/prefix, else the local folder."""
    url = settings.store_url
    if url:
        return S3Store(url, endpoint_url=settings.store_endpoint_url, region=settings.store_region,
                       spool=settings.home.resolve() / "spool")
    return LocalStore(settings.resolved_artifact_dir)
