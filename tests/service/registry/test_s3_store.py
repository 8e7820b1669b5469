"""The artifact stores against a real S3 protocol server (moto's): the interface both stores share,
atomicity and verification on S3, readiness, and the registry API storing and serving weights from S3."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import boto3
import httpx
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.registry.storage import ArtifactError, FolderStore, S3Store, artifact_store, sha256_of
from tests.service_fixtures import register_digits, with_s3

WEIGHTS = bytes(range(256)) * 4096 + b"tail"  # 1 MiB and a bit: more than one chunk


@pytest.fixture(params=["folder", "s3"])
def store(request, tmp_path):
    if request.param == "folder":
        return FolderStore(tmp_path / "artifacts")
    s3 = request.getfixturevalue("s3")
    return S3Store(s3.bucket, "some/prefix")


def incoming_with(store, data: bytes) -> Path:
    incoming = store.new_incoming()
    incoming.write_bytes(data)
    return incoming


# --- the interface, on both stores --------------------------------------------------------------------------------

def test_a_stored_file_is_content_addressed_and_reads_back_whole_in_ranges_and_as_a_local_copy(store, tmp_path):
    sha = hashlib.sha256(WEIGHTS).hexdigest()
    incoming = incoming_with(store, WEIGHTS)
    assert store.put(incoming) == (sha, len(WEIGHTS))
    assert not incoming.exists(), "put consumes its source"
    assert store.exists(sha) and not store.exists("0" * 64)
    assert store.key_for(sha).endswith(f"{sha[:2]}/{sha}.safetensors")

    whole = store.open(sha)
    assert whole.length == len(WEIGHTS) and b"".join(whole.chunks) == WEIGHTS
    whole.close()
    part = store.open(sha, 10, 19)
    assert part.length == 10 and b"".join(part.chunks) == WEIGHTS[10:20]
    part.close()

    store.fetch(sha, tmp_path / "copy.safetensors")
    assert (tmp_path / "copy.safetensors").read_bytes() == WEIGHTS

    assert store.put(incoming_with(store, WEIGHTS)) == (sha, len(WEIGHTS)), "the same content again is a no-op"
    store.delete(sha)
    assert not store.exists(sha)
    store.delete(sha)  # deleting twice is harmless
    with pytest.raises(FileNotFoundError):
        store.open(sha)
    with pytest.raises(FileNotFoundError):
        store.fetch(sha, tmp_path / "gone.safetensors")
    store.check()


def test_stored_lists_every_artifact_and_putting_the_same_content_again_makes_it_fresh(store):
    sha = store.put(incoming_with(store, WEIGHTS))[0]
    other = store.put(incoming_with(store, b"other weights"))[0]
    listed = dict(store.stored())
    assert set(listed) == {sha, other}
    written = listed[sha]
    time.sleep(1.1)  # S3's LastModified has whole seconds
    store.put(incoming_with(store, WEIGHTS))  # a registration of the same weights: about to be named again
    assert dict(store.stored())[sha] > written


def test_unfinished_uploads_older_than_the_cutoff_are_removed_and_newer_ones_kept(store, tmp_path, monkeypatch):
    import tempfile
    from datetime import datetime, timedelta, timezone

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the S3 store's local parts: this test's only
    part = store.new_incoming()
    part.write_bytes(b"half an upload")
    now = datetime.now(timezone.utc)
    assert store.remove_stale_parts(now - timedelta(hours=1)) == 0 and part.exists()
    if isinstance(store, S3Store):  # a multipart upload never completed (moto dates every one 2010: made after
        store.client.create_multipart_upload(Bucket=store.bucket, Key=store.key_for("f" * 64))  # the check above)
    assert store.remove_stale_parts(now + timedelta(seconds=5)) == (2 if isinstance(store, S3Store) else 1)
    assert not part.exists()
    if isinstance(store, S3Store):
        assert not store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads")


def test_the_settings_choose_the_store(s3, tmp_path):
    from service.config import Settings

    s3_store = artifact_store(Settings(home=tmp_path, artifacts_uri=f"s3://{s3.bucket}/models/v1/"))
    assert isinstance(s3_store, S3Store) and (s3_store.bucket, s3_store.prefix) == (s3.bucket, "models/v1")
    folder = artifact_store(Settings(home=tmp_path))
    assert isinstance(folder, FolderStore) and folder.root == tmp_path / "artifacts"
    assert artifact_store(Settings(home=tmp_path, artifacts_uri=str(tmp_path / "x"))).root == tmp_path / "x"


@pytest.mark.parametrize("uri", ["s3://", "s3://Bad_Bucket/x", "http://example.org/x", "s3://bucket/a?b"])
def test_a_malformed_artifacts_uri_fails_when_the_settings_load(uri):
    from pydantic import ValidationError

    from service.config import Settings

    with pytest.raises(ValidationError):
        Settings(artifacts_uri=uri)


# --- S3: layout, atomicity, verification ---------------------------------------------------------------------------

def test_s3_keys_are_prefix_sha_prefix_sha(s3):
    sha, _ = S3Store(s3.bucket, "/models/").put(incoming_with(S3Store(s3.bucket), WEIGHTS))
    assert s3.keys() == [f"models/{sha[:2]}/{sha}.safetensors"]
    head = s3.client.head_object(Bucket=s3.bucket, Key=f"models/{sha[:2]}/{sha}.safetensors")
    assert head["Metadata"]["sha256"] == sha and head["ContentLength"] == len(WEIGHTS)


class WrappedBody:
    """A file-like upload body over ``f``; subclasses change how it reads."""

    def __init__(self, f) -> None:
        self.f = f

    def seek(self, *args):
        return self.f.seek(*args)

    def tell(self) -> int:
        return self.f.tell()


class InterruptedBody(WrappedBody):
    """A file whose reads fail after ``limit`` bytes, as when the disk or the process goes away mid-upload."""

    def __init__(self, f, limit: int) -> None:
        super().__init__(f)
        self.limit = limit

    def read(self, size: int = -1) -> bytes:
        if self.f.tell() >= self.limit:
            raise OSError("connection to the disk lost")
        return self.f.read(min(size if size >= 0 else self.limit, self.limit - self.f.tell()))


def test_an_interrupted_upload_leaves_no_object_under_the_final_key(s3, monkeypatch):
    store = S3Store(s3.bucket, "artifacts")
    upload = store._upload
    monkeypatch.setattr(store, "_upload", lambda body, *args: upload(InterruptedBody(body, 300_000), *args))
    with pytest.raises(Exception):
        store.put(incoming_with(store, WEIGHTS))
    assert not store.exists(hashlib.sha256(WEIGHTS).hexdigest())
    assert s3.keys() == []


def test_an_upload_that_stored_other_bytes_is_deleted_and_refused(s3, monkeypatch):
    store = S3Store(s3.bucket, "artifacts")
    upload = store._upload
    corrupt = WEIGHTS[:-4] + b"TAIL"  # same size, other content
    monkeypatch.setattr(store, "_upload", lambda body, *args: upload(__import__("io").BytesIO(corrupt), *args))
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        store.put(incoming_with(store, WEIGHTS))
    assert s3.keys() == []


def test_a_corrupt_object_already_under_the_key_is_replaced_not_trusted(s3):
    store = S3Store(s3.bucket, "artifacts")
    sha = hashlib.sha256(WEIGHTS).hexdigest()
    s3.client.put_object(Bucket=s3.bucket, Key=store.key_for(sha), Body=WEIGHTS[:-4] + b"TAIL")
    assert store.put(incoming_with(store, WEIGHTS)) == (sha, len(WEIGHTS))
    assert s3.client.get_object(Bucket=s3.bucket, Key=store.key_for(sha))["Body"].read() == WEIGHTS


def test_fetch_refuses_an_object_that_does_not_match_its_sha256(s3, tmp_path):
    store = S3Store(s3.bucket, "artifacts")
    sha = hashlib.sha256(WEIGHTS).hexdigest()
    s3.client.put_object(Bucket=s3.bucket, Key=store.key_for(sha), Body=b"something else")
    with pytest.raises(ArtifactError):
        store.fetch(sha, tmp_path / "model.safetensors")
    assert list(tmp_path.iterdir()) == []


class SlowBody(WrappedBody):
    """Yields a file slowly, so that a reader can look while the upload is in flight."""

    def __init__(self, f, started: threading.Event) -> None:
        super().__init__(f)
        self.started = started

    def read(self, size: int = -1) -> bytes:
        self.started.set()
        time.sleep(0.05)
        return self.f.read(min(size if size >= 0 else 65536, 65536))


def test_a_reader_never_sees_a_partial_object(s3, monkeypatch):
    store = S3Store(s3.bucket, "artifacts")
    sha = hashlib.sha256(WEIGHTS).hexdigest()
    started = threading.Event()
    upload = store._upload
    monkeypatch.setattr(store, "_upload", lambda body, *args: upload(SlowBody(body, started), *args))
    writer = threading.Thread(target=store.put, args=(incoming_with(store, WEIGHTS),))
    writer.start()
    assert started.wait(10)
    seen = []
    while writer.is_alive():
        if store.exists(sha):
            seen.append(b"".join(store.open(sha).chunks))
        time.sleep(0.02)
    writer.join()
    assert all(body == WEIGHTS for body in seen), "a reader saw a partial object"
    assert b"".join(store.open(sha).chunks) == WEIGHTS


# --- S3: readiness ---------------------------------------------------------------------------------------------------

def test_check_reports_a_missing_bucket_and_an_unreachable_endpoint(s3):
    S3Store(s3.bucket).check()
    with pytest.raises(OSError) as missing:
        S3Store("no-such-bucket-here").check()
    assert missing.value.strerror == "bucket not found"
    unreachable = boto3.session.Session().client("s3", endpoint_url="http://127.0.0.1:9")
    with pytest.raises(OSError) as down:
        S3Store(s3.bucket, client=unreachable).check()
    assert "unreachable" in down.value.strerror


# --- the registry API on S3 ------------------------------------------------------------------------------------------

@pytest.fixture
def backend(backend, s3):
    """Every fixture of this module that uses the backend (client, admin) gets its S3 variant."""
    return with_s3(backend, s3)


@pytest.fixture
def registered(client, admin, digits_model, s3):
    response = register_digits(client, admin, digits_model)
    assert response.status_code == 201, response.text
    return response.json()


def test_a_registered_model_is_stored_in_s3_and_nowhere_local(backend, registered, s3, digits_model):
    sha = registered["sha256"]
    assert sha == sha256_of(digits_model / "model.safetensors")[0]
    assert s3.keys("artifacts/") == [f"artifacts/{sha[:2]}/{sha}.safetensors"]
    assert not (Path(backend.env["LETHE_HOME"]) / "artifacts").exists()


def test_weights_are_streamed_from_s3_with_length_etag_ranges_and_304(client, admin, registered, digits_model):
    url, expected = "/models/digits/versions/1/weights", (digits_model / "model.safetensors").read_bytes()
    etag = f'"{registered["sha256"]}"'
    response = client.get(url, headers=admin)
    assert response.status_code == 200 and response.content == expected
    assert response.headers["content-length"] == str(len(expected))
    assert response.headers["etag"] == etag and response.headers["accept-ranges"] == "bytes"
    assert "model.safetensors" in response.headers["content-disposition"]

    ranged = client.get(url, headers={**admin, "Range": "bytes=0-9"})
    assert ranged.status_code == 206 and ranged.content == expected[:10]
    assert ranged.headers["content-range"] == f"bytes 0-9/{len(expected)}"
    assert client.get(url, headers={**admin, "Range": "bytes=-16"}).content == expected[-16:]
    beyond = len(expected) + 10
    assert client.get(url, headers={**admin, "Range": f"bytes={beyond}-{beyond + 5}"}).status_code == 416

    cached = client.get(url, headers={**admin, "If-None-Match": etag})
    assert cached.status_code == 304 and cached.content == b"" and cached.headers["etag"] == etag
    head = client.head(url, headers=admin)
    assert head.status_code == 200 and head.headers["content-length"] == str(len(expected))


def test_with_redirects_weights_answer_307_to_a_presigned_url_that_works(backend, admin, registered, digits_model):
    settings = backend.settings.model_copy(update={"artifacts_redirect": True, "artifacts_presign_seconds": 60})
    with TestClient(create_app(settings, enqueue=lambda _id: None)) as redirecting:
        response = redirecting.get("/models/digits/versions/1/weights", headers=admin, follow_redirects=False)
    assert response.status_code == 307
    assert response.headers["etag"] == f'"{registered["sha256"]}"'
    location = response.headers["location"]
    assert location.startswith(backend.env["AWS_ENDPOINT_URL"]) and "X-Amz-Expires=60" in location
    download = httpx.get(location)  # no API key: the URL carries its own signature
    assert download.status_code == 200
    assert download.content == (digits_model / "model.safetensors").read_bytes()


def test_readiness_checks_the_bucket(client, backend):
    body = client.get("/readyz").json()
    assert body["checks"]["artifacts"] == "ok", body
