"""Artifact storage: weights content-addressed by sha256, in a local folder or on S3-compatible storage.

Both stores keep ``<sha[:2]>/<sha>.safetensors`` (under the S3 URI's prefix) and store a file
whole and verified or not at all: ``put`` returns only once the object under the final name holds
exactly the bytes whose sha256 it names. A version becomes visible to readers only when the
registry row naming it commits, which is after ``put`` returned. ``artifact_store(settings)`` is the
one place that chooses the store (``LETHE_ARTIFACTS_URI``: a folder, or ``s3://bucket/prefix`` with
the endpoint and credentials boto3 reads from the usual ``AWS_*`` variables).
"""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import re
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from service.errors import ArtifactError
from service.s3_uris import split_s3_uri

if TYPE_CHECKING:
    from service.config import Settings

CHUNK = 1 << 20
SINGLE_PUT_LIMIT = 5 * 1024**3  # S3's largest PutObject; larger files go up as a multipart upload
NOT_FOUND = ("404", "NoSuchKey", "NotFound")
ARTIFACT_KEY = re.compile(r"[0-9a-f]{2}/(?P<sha256>[0-9a-f]{64})\.safetensors")


def sha256_of(path: Path) -> tuple[str, int]:
    """(hex sha256, size) of a local file."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


@dataclass
class Download:
    """An artifact's bytes (or a byte range of them) being read: iterate ``chunks``, then ``close()``."""

    chunks: Iterator[bytes]
    length: int  # bytes that ``chunks`` yields
    close: Callable[[], None]


class ArtifactStore(ABC):
    """Weights files content-addressed by sha256; a file appears under its final name complete or not at all."""

    def key_for(self, sha256: str) -> str:
        return f"{sha256[:2]}/{sha256}.safetensors"

    @abstractmethod
    def exists(self, sha256: str) -> bool: ...

    @abstractmethod
    def new_incoming(self) -> Path:
        """A fresh local temporary file to write an upload or a new version into, before ``put``."""

    @abstractmethod
    def put(self, source: Path) -> tuple[str, int]:
        """Store a local file (consumed: moved or uploaded, then removed); returns (sha256, size)."""

    @abstractmethod
    def fetch(self, sha256: str, target: Path) -> None:
        """The artifact as a local file at ``target`` (a new path), for the engine to read."""

    @abstractmethod
    def open(self, sha256: str, first: int = 0, last: int | None = None) -> Download:
        """Bytes ``first`` to ``last`` (inclusive; None: to the end); FileNotFoundError when absent."""

    @abstractmethod
    def delete(self, sha256: str) -> None: ...

    @abstractmethod
    def stored(self) -> Iterator[tuple[str, datetime]]:
        """Every artifact in the store: (sha256, when it was last written), for the orphan sweep."""

    @abstractmethod
    def written(self, sha256: str) -> datetime | None:
        """When the artifact was last written; None when it is not in the store."""

    @abstractmethod
    def remove_stale_parts(self, before: datetime) -> int:
        """Delete unfinished uploads begun before ``before``; returns how many."""

    @abstractmethod
    def check(self) -> None:
        """Readiness: the store is reachable and writable; OSError (with a short ``strerror``) otherwise."""

    def local_path(self, sha256: str) -> Path | None:
        """The artifact's file when the store is a local folder (served directly); None otherwise."""
        return None

    def presigned_url(self, sha256: str, seconds: int) -> str | None:
        """A URL that downloads the artifact without credentials for ``seconds``; None where the store has none."""
        return None


class FolderStore(ArtifactStore):
    """``root/<sha[:2]>/<sha>.safetensors``; files are renamed into place from ``root/.incoming``."""

    def __init__(self, root: Path, min_free_bytes: int = 0) -> None:
        self.root = Path(root)
        self.min_free_bytes = min_free_bytes

    def path_for(self, sha256: str) -> Path:
        return self.root / self.key_for(sha256)

    def exists(self, sha256: str) -> bool:
        return self.path_for(sha256).is_file()

    def new_incoming(self) -> Path:
        """A fresh temporary file on the store's filesystem (so the final rename is atomic)."""
        incoming = self.root / ".incoming"
        incoming.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=incoming, suffix=".part")
        os.close(fd)
        return Path(name)

    def put(self, source: Path) -> tuple[str, int]:
        """Move a file written under ``new_incoming()`` into place; returns (sha256, size)."""
        sha256, size = sha256_of(source)
        target = self.path_for(sha256)
        if target.is_file():
            source.unlink()  # same content stored already:
            os.utime(target)  # fresh again, so the orphan sweep's grace period covers this put's commit too
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(source, 0o644)
            os.replace(source, target)
        return sha256, size

    def fetch(self, sha256: str, target: Path) -> None:
        source = self.path_for(sha256)
        if not source.is_file():
            raise FileNotFoundError(f"artifact {sha256} is not in the store")
        try:
            target.symlink_to(source)  # versions are immutable: a link is as good as a copy
        except OSError:
            shutil.copyfile(source, target)

    def open(self, sha256: str, first: int = 0, last: int | None = None) -> Download:
        f = open(self.path_for(sha256), "rb")
        size = os.fstat(f.fileno()).st_size
        last = size - 1 if last is None else min(last, size - 1)
        f.seek(first)

        def chunks(left: int = last - first + 1) -> Iterator[bytes]:
            while left > 0 and (chunk := f.read(min(CHUNK, left))):
                left -= len(chunk)
                yield chunk

        return Download(chunks(), max(0, last - first + 1), f.close)

    def local_path(self, sha256: str) -> Path:
        return self.path_for(sha256)

    def delete(self, sha256: str) -> None:
        self.path_for(sha256).unlink(missing_ok=True)

    def stored(self) -> Iterator[tuple[str, datetime]]:
        for path in self.root.glob("??/*.safetensors"):
            match = ARTIFACT_KEY.fullmatch(f"{path.parent.name}/{path.name}")
            try:
                if match:
                    yield match["sha256"], datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
            except FileNotFoundError:  # deleted meanwhile
                continue

    def written(self, sha256: str) -> datetime | None:
        try:
            return datetime.fromtimestamp(self.path_for(sha256).stat().st_mtime, timezone.utc)
        except FileNotFoundError:
            return None

    def remove_stale_parts(self, before: datetime) -> int:
        return remove_old_files((self.root / ".incoming").glob("*.part"), before)

    def check(self) -> None:
        """Readiness: the folder exists (or can be made), takes a file, and has LETHE_MIN_FREE_BYTES
        free (a disk that is almost full would take the next request and fail its run); OSError otherwise."""
        self.root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=self.root, prefix=".ready-"):
            pass
        free = shutil.disk_usage(self.root).free
        if free < self.min_free_bytes:
            raise ArtifactError(errno.ENOSPC, f"storage almost full ({free} bytes free, "
                                              f"LETHE_MIN_FREE_BYTES is {self.min_free_bytes})")


AWS_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE")
_clients: dict[tuple, object] = {}


def s3_client():
    """A boto3 S3 client configured from the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...).

    One per process and environment: clients are thread-safe but their connections must not cross
    a fork (Celery's pool processes make their own), and building one takes a while.
    """
    key = (os.getpid(), *(os.environ.get(name) for name in AWS_VARIABLES))
    if key not in _clients:
        import boto3
        from botocore.config import Config

        config = Config(signature_version="s3v4", connect_timeout=5, read_timeout=60,
                        retries={"max_attempts": 3, "mode": "standard"})
        _clients[key] = boto3.session.Session().client("s3", config=config)
    return _clients[key]


def is_not_found(exc: Exception) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in NOT_FOUND


class S3Store(ArtifactStore):
    """``s3://bucket/prefix/<sha[:2]>/<sha>.safetensors``.

    An object is written by one PutObject (a multipart upload above 5 GiB), which S3 makes visible
    only once complete, carrying the sha256 computed beforehand so that the server refuses a body
    that does not match it. ``put`` then verifies the stored object (the server's SHA-256 checksum
    where it keeps one, otherwise its bytes read back) before returning, so a registry row never
    names an object that is partial or wrong.
    """

    def __init__(self, bucket: str, prefix: str = "", client=None) -> None:
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.client = client if client is not None else s3_client()

    def __repr__(self) -> str:
        return f"S3Store(s3://{self.bucket}/{self.prefix})"

    def key_for(self, sha256: str) -> str:
        key = super().key_for(sha256)
        return f"{self.prefix}/{key}" if self.prefix else key

    def exists(self, sha256: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key_for(sha256))
            return True
        except Exception as exc:
            if is_not_found(exc):
                return False
            raise

    def new_incoming(self) -> Path:
        """A temporary file in the system's temporary folder (TMPDIR), where runs write their candidates too."""
        fd, name = tempfile.mkstemp(prefix="lethe-upload-", suffix=".part")
        os.close(fd)
        return Path(name)

    def put(self, source: Path) -> tuple[str, int]:
        """Upload a local file under its sha256 unless an intact copy is there already; the file is removed."""
        try:
            sha256, size = sha256_of(source)
            key = self.key_for(sha256)
            if size <= SINGLE_PUT_LIMIT and self._holds(key, sha256, size):
                self._refresh(key, sha256)
            else:  # (a larger file already there is sent again: CopyObject stops at 5 GB)
                with open(source, "rb") as body:
                    self._upload(body, key, sha256, size)
                if not self._holds(key, sha256, size):
                    self.client.delete_object(Bucket=self.bucket, Key=key)
                    raise ArtifactError(errno.EIO, f"s3://{self.bucket}/{key} does not match its sha256 after upload")
        finally:
            source.unlink(missing_ok=True)
        return sha256, size

    def _refresh(self, key: str, sha256: str) -> None:
        """An object stored already (same content) is copied onto itself, so that its LastModified is
        now and the orphan sweep's grace period covers the commit that will name it."""
        self.client.copy_object(Bucket=self.bucket, Key=key, CopySource={"Bucket": self.bucket, "Key": key},
                                MetadataDirective="REPLACE", Metadata={"sha256": sha256},
                                ContentType="application/octet-stream", ChecksumAlgorithm="SHA256")

    def _upload(self, body, key: str, sha256: str, size: int) -> None:
        if size <= SINGLE_PUT_LIMIT:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentLength=size,
                                   ContentType="application/octet-stream", Metadata={"sha256": sha256},
                                   ChecksumSHA256=base64.b64encode(bytes.fromhex(sha256)).decode())
        else:  # each part carries its own SHA-256 checksum; the object appears when the upload completes
            self.client.upload_fileobj(body, self.bucket, key, ExtraArgs={
                "ContentType": "application/octet-stream", "Metadata": {"sha256": sha256},
                "ChecksumAlgorithm": "SHA256"})

    def _holds(self, key: str, sha256: str, size: int) -> bool:
        """The object under ``key`` exists with this size and sha256."""
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
        except Exception as exc:
            if is_not_found(exc):
                return False
            raise
        if head["ContentLength"] != size:
            return False
        checksum = head.get("ChecksumSHA256")
        if checksum and "-" not in checksum:  # "...-N" is a multipart checksum of checksums, not the file's
            return checksum == base64.b64encode(bytes.fromhex(sha256)).decode()
        digest = hashlib.sha256()
        body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
        try:
            for chunk in body.iter_chunks(CHUNK):
                digest.update(chunk)
        finally:
            body.close()
        return digest.hexdigest() == sha256

    def fetch(self, sha256: str, target: Path) -> None:
        """Download to ``target`` (through a temporary name) and check the bytes against the sha256."""
        partial = target.with_name(target.name + ".part")
        try:
            self.client.download_file(self.bucket, self.key_for(sha256), str(partial))
        except Exception as exc:
            partial.unlink(missing_ok=True)
            if is_not_found(exc):
                raise FileNotFoundError(f"artifact {sha256} is not in {self!r}") from None
            raise
        if sha256_of(partial)[0] != sha256:
            partial.unlink()
            raise ArtifactError(errno.EIO, f"artifact {sha256} downloaded from {self!r} does not match its sha256")
        os.replace(partial, target)

    def open(self, sha256: str, first: int = 0, last: int | None = None) -> Download:
        ranged = {} if first == 0 and last is None else {"Range": f"bytes={first}-{'' if last is None else last}"}
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.key_for(sha256), **ranged)
        except Exception as exc:
            if is_not_found(exc):
                raise FileNotFoundError(f"artifact {sha256} is not in {self!r}") from None
            raise
        body = response["Body"]
        return Download(body.iter_chunks(CHUNK), response["ContentLength"], body.close)

    def delete(self, sha256: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key_for(sha256))

    def stored(self) -> Iterator[tuple[str, datetime]]:
        prefix = f"{self.prefix}/" if self.prefix else ""
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                match = ARTIFACT_KEY.fullmatch(item["Key"][len(prefix):])
                if match:
                    yield match["sha256"], item["LastModified"]

    def written(self, sha256: str) -> datetime | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self.key_for(sha256))["LastModified"]
        except Exception as exc:
            if is_not_found(exc):
                return None
            raise

    def remove_stale_parts(self, before: datetime) -> int:
        """Multipart uploads never completed (their parts are billed and hold weights), and this host's
        temporary upload files."""
        removed = 0
        prefix = f"{self.prefix}/" if self.prefix else ""
        for page in self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=prefix):
            for upload in page.get("Uploads", []):
                if upload["Initiated"] < before:
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"],
                                                       UploadId=upload["UploadId"])
                    removed += 1
        return removed + remove_old_files(Path(tempfile.gettempdir()).glob("lethe-upload-*.part"), before)

    def check(self) -> None:
        """Readiness: the bucket answers HeadBucket with these credentials."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "error")
            reason = {"404": "bucket not found", "NoSuchBucket": "bucket not found",
                      "403": "access denied", "AccessDenied": "access denied"}.get(code, f"S3 {code}")
            raise ArtifactError(errno.EIO, reason) from None
        except BotoCoreError as exc:  # no endpoint, no credentials, a timeout
            raise ArtifactError(errno.EIO, f"S3 unreachable ({type(exc).__name__})") from None

    def presigned_url(self, sha256: str, seconds: int) -> str:
        return self.client.generate_presigned_url("get_object", ExpiresIn=seconds, Params={
            "Bucket": self.bucket, "Key": self.key_for(sha256),
            "ResponseContentType": "application/octet-stream",
            "ResponseContentDisposition": 'attachment; filename="model.safetensors"'})


def remove_old_files(paths: Iterator[Path], before: datetime) -> int:
    removed = 0
    for path in paths:
        try:
            if datetime.fromtimestamp(path.stat().st_mtime, timezone.utc) < before:
                path.unlink()
                removed += 1
        except FileNotFoundError:  # finished or removed meanwhile
            continue
    return removed


def artifact_store(settings: Settings) -> ArtifactStore:
    """The store ``LETHE_ARTIFACTS_URI`` names: ``s3://bucket/prefix``, or a folder (default ``$LETHE_HOME/artifacts``).

    The one place that chooses: the API (``app.state.store``) and the workers both call it.
    """
    if settings.artifacts_uri and settings.artifacts_uri.startswith("s3://"):
        location = split_s3_uri(settings.artifacts_uri)
        return S3Store(location.bucket, location.key)
    return FolderStore(settings.artifacts, min_free_bytes=settings.min_free_bytes)
