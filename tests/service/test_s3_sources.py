"""Forget and evaluation sets on S3: LETHE_DATA_ROOTS with s3:// prefixes, the lexical check at POST,
the worker's download into the run's folder, and a request served end to end from S3 by a real worker."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from service.config import Settings
from service.errors import InvalidInput
from service.registry.storage import sha256_of
from service.s3_uris import S3Location
from service.sources import LocalSources, OutsideDataRoots, UnreadableSource, check_data_root
from tests.service_fixtures import register_digits, request_body, wait_for, with_s3

ROOTS = [Path("/data/sets"), S3Location("lethe-data", "erasure-requests")]


# --- LETHE_DATA_ROOTS ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "roots"), [
    ("/a:/b", [Path("/a"), Path("/b")]),
    ("/a,/b", [Path("/a"), Path("/b")]),
    (" /a , s3://bkt/x/y/ ,", [Path("/a"), S3Location("bkt", "x/y")]),
    ("s3://bkt", [S3Location("bkt", "")]),
    ("", []),
], ids=["colons (the older form)", "commas", "folders and s3 prefixes", "a whole bucket", "none"])
def test_data_roots_are_comma_separated_or_the_older_colon_separated_folders(value, roots):
    assert Settings(data_roots=value).allowed_data_roots == roots


def test_a_malformed_s3_data_root_fails_when_the_settings_load():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        Settings(data_roots="/a,s3://Not_A_Bucket/x")


# --- the lexical check -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("uri", "normalised"), [
    ("s3://lethe-data/erasure-requests/subject-1/3", "s3://lethe-data/erasure-requests/subject-1/3"),
    ("s3://lethe-data/erasure-requests", "s3://lethe-data/erasure-requests"),
    ("s3://lethe-data/erasure-requests/a/../b/./c/", "s3://lethe-data/erasure-requests/b/c"),
    ("s3://lethe-data/erasure-requests//a", "s3://lethe-data/erasure-requests/a"),
])
def test_s3_references_inside_an_s3_root_are_accepted_normalised(uri, normalised):
    assert str(check_data_root(uri, ROOTS)) == normalised


@pytest.mark.parametrize("uri", [
    "s3://lethe-data/erasure-requests/../secrets/x",
    "s3://lethe-data/erasure-requests/a/../../secrets",
    "s3://lethe-data/erasure-requests-evil/x",
    "s3://lethe-data/other",
    "s3://lethe-data",
    "s3://other-bucket/erasure-requests/x",
], ids=["dotdot", "deep dotdot", "sibling prefix", "other prefix", "bucket root", "other bucket"])
def test_s3_references_outside_the_s3_roots_are_refused(uri):
    with pytest.raises(OutsideDataRoots):
        check_data_root(uri, ROOTS)


@pytest.mark.parametrize("uri", ["s3://", "s3://B/x", "s3://lethe-data/erasure-requests/x?versionId=1",
                                 "s3://lethe-data/erasure-requests/x#y", "s3:/lethe-data/erasure-requests"])
def test_malformed_s3_references_are_invalid_input(uri):
    with pytest.raises(InvalidInput):
        check_data_root(uri, ROOTS)


def test_a_folder_root_never_admits_an_s3_reference_nor_the_reverse():
    with pytest.raises(OutsideDataRoots):
        check_data_root("s3://lethe-data/x", [Path("/data")])
    with pytest.raises(OutsideDataRoots):
        check_data_root("file:///data/sets/x", [S3Location("lethe-data", "")])


# --- the worker's local copies ---------------------------------------------------------------------------------------

@pytest.fixture
def digits_in_s3(s3, digits):
    """digits' train/3 under forget-sets/subject-1/3/ in the bucket."""
    s3.upload_folder(digits.train_class("3"), "forget-sets/subject-1/3")
    return s3


def local_sources(s3, folder: Path, *roots) -> LocalSources:
    return LocalSources(list(roots) or [S3Location(s3.bucket, "forget-sets")], folder)


def test_an_s3_folder_is_downloaded_keeping_its_name_and_every_image(digits_in_s3, digits, tmp_path):
    sources = local_sources(digits_in_s3, tmp_path / "run")
    local = sources.path(digits_in_s3.uri("forget-sets/subject-1/3"))
    assert local.name == "3" and local.is_relative_to(tmp_path / "run")  # the engine labels by folder name
    expected = sorted(p.name for p in digits.train_class("3").iterdir())
    assert sorted(p.name for p in local.iterdir()) == expected
    assert sources.path(digits_in_s3.uri("forget-sets/subject-1/3/")) == local, "downloaded once per run"


def test_an_s3_archive_or_manifest_object_is_downloaded_with_what_it_names(s3, digits, tmp_path):
    images = sorted(digits.train_class("3").iterdir())[:5]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for image in images:
            archive.add(image, arcname=f"3/{image.name}")
    s3.client.put_object(Bucket=s3.bucket, Key="forget-sets/s2/set.tar.gz", Body=buffer.getvalue())
    s3.upload_folder(digits.train_class("3"), "forget-sets/s3/images")
    manifest = "\n".join(json.dumps({"path": f"images/{p.name}", "label": "3"}) for p in images)
    s3.client.put_object(Bucket=s3.bucket, Key="forget-sets/s3/set.jsonl", Body=manifest.encode())
    sources = local_sources(s3, tmp_path / "run")

    archive_path = sources.path(s3.uri("forget-sets/s2/set.tar.gz"))
    assert archive_path.name == "set.tar.gz" and archive_path.read_bytes() == buffer.getvalue()
    manifest_path = sources.path(s3.uri("forget-sets/s3/set.jsonl"))
    assert sorted(p.name for p in (manifest_path.parent / "images").iterdir()) == [p.name for p in images]

    from worker.engine.images import list_images

    assert len(list(list_images(str(manifest_path)))) == 5 and len(list(list_images(str(archive_path)))) == 5


def test_nothing_under_an_s3_reference_or_an_unsafe_key_is_unreadable(s3, tmp_path):
    sources = local_sources(s3, tmp_path / "run")
    with pytest.raises(UnreadableSource):
        sources.path(s3.uri("forget-sets/nobody"))
    s3.client.put_object(Bucket=s3.bucket, Key="forget-sets/evil/../../escape.png", Body=b"x")
    with pytest.raises(UnreadableSource):
        sources.path(s3.uri("forget-sets/evil"))
    assert not (tmp_path / "escape.png").exists()


def test_the_worker_checks_s3_references_again_against_its_own_roots(digits_in_s3, tmp_path):
    sources = local_sources(digits_in_s3, tmp_path / "run", S3Location(digits_in_s3.bucket, "elsewhere"))
    with pytest.raises(OutsideDataRoots):
        sources.path(digits_in_s3.uri("forget-sets/subject-1/3"))
    assert not (tmp_path / "run").exists()


# --- the API and a real worker, with artifacts and forget sets on S3 -------------------------------------------------

@pytest.fixture
def backend(backend, s3):
    return with_s3(backend, s3)


@pytest.mark.parametrize("uri", ["s3://{bucket}/elsewhere/3", "s3://{bucket}/forget-sets/../elsewhere/3",
                                 "s3://{bucket}/forget-sets-evil/3", "s3://another-bucket/forget-sets/3"],
                         ids=["other prefix", "dotdot", "sibling prefix", "other bucket"])
def test_posting_an_s3_forget_set_outside_the_s3_roots_is_422(client, admin, digits, digits_model, s3, enqueued, uri):
    assert register_digits(client, admin, digits_model).status_code == 201
    response = client.post("/deletion-requests", headers=admin,
                           json=request_body(digits, uri=uri.format(bucket=s3.bucket)))
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "outside_data_roots"
    assert enqueued == []
    eval_outside = register_digits(client, admin, digits_model, name="other", eval_set=s3.uri("elsewhere/val"))
    assert eval_outside.status_code == 422 and eval_outside.json()["code"] == "outside_data_roots"


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)  # Postgres + Redis: tests/worker/test_multi_worker.py
def test_a_request_with_an_s3_forget_set_is_served_by_a_worker_into_a_version_stored_in_s3(
        backend, client, admin, digits, digits_model, digits_in_s3, start_worker, tmp_path):
    assert register_digits(client, admin, digits_model).status_code == 201
    scratch = tmp_path / "worker-tmp"  # the worker's TMPDIR: its run folders, downloads included
    scratch.mkdir()
    worker = start_worker(TMPDIR=str(scratch))
    body = request_body(digits, uri=digits_in_s3.uri("forget-sets/subject-1/3"))
    request_id = client.post("/deletion-requests", headers=admin, json=body).json()["id"]

    def finished():
        answer = client.get(f"/deletion-requests/{request_id}", headers=admin).json()
        return answer if answer["status"] not in ("queued", "running") else None

    result = wait_for(finished, 240, message=f"the request to finish; worker log:\n{worker.output()[-3000:]}")
    assert result["status"] == "propagated", result
    current = client.get("/models/current", headers=admin).json()
    assert current["version"] == 2 and current["classes_forgotten"] == ["3"]
    sha = current["sha256"]
    assert f"artifacts/{sha[:2]}/{sha}.safetensors" in digits_in_s3.keys("artifacts/")
    weights = client.get("/models/digits/versions/2/weights", headers=admin)
    assert weights.status_code == 200
    (tmp_path / "v2.safetensors").write_bytes(weights.content)
    assert sha256_of(tmp_path / "v2.safetensors")[0] == sha
    # The request is settled before the task returns and removes its folder: give it the moment between.
    wait_for(lambda: not list(scratch.glob("lethe-*")), 30,
             message="the run's folder (and the downloaded forget set) to go once the run ended")
    assert not (Path(backend.env["LETHE_HOME"]) / "artifacts").exists()
