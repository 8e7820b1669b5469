"""Registry endpoints: register a base model, read ``current`` (ETag, 304), list versions, download weights (Range, 410)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from service.app import create_app
from service.db import session_scope, utcnow
from service.registry.models import ModelVersion, RegisteredModel
from tests.service.conftest import register_digits

PROBLEM_JSON = "application/problem+json"


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def post_model(client, headers, name="digits", card: bytes | None = None, weights: bytes | None = None,
               eval_set: str | None = None, package: Path | None = None):
    """POST /models with any part replaced (``card``/``weights`` bytes default to the package's files)."""
    data = {"name": name, **({"eval_set": eval_set} if eval_set is not None else {})}
    files = {"card": ("model.json", card if card is not None else (package / "model.json").read_bytes()),
             "weights": ("model.safetensors",
                         weights if weights is not None else (package / "model.safetensors").read_bytes())}
    return client.post("/models", headers=headers, data=data, files=files)


def card_with(package: Path, **changes) -> bytes:
    card = json.loads((package / "model.json").read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        target = card
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return json.dumps(card).encode()


def assert_problem(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM_JSON)
    problem = response.json()
    assert problem["status"] == status and problem["detail"]
    if code is not None:
        assert problem["code"] == code, problem
    return problem


def assert_nothing_registered(backend) -> None:
    with session_scope(backend.settings.database) as session:
        assert session.scalars(select(RegisteredModel)).all() == []
        assert session.scalars(select(ModelVersion)).all() == []
    artifacts = backend.settings.artifacts
    stored = [p for p in artifacts.rglob("*") if p.is_file()] if artifacts.exists() else []
    assert stored == [], f"a refused upload left files behind: {stored}"


@pytest.fixture
def registered(client, admin, digits_model):
    response = register_digits(client, admin, digits_model)
    assert response.status_code == 201, response.text
    return response.json()


# --- POST /models ---------------------------------------------------------------------------------------------------

def test_registering_a_model_creates_version_1_as_current(client, admin, digits_model):
    response = register_digits(client, admin, digits_model)
    assert response.status_code == 201, response.text
    assert response.headers["location"] == "/models/digits/versions/1"
    body = response.json()
    weights = digits_model / "model.safetensors"
    assert body["model"] == "digits"
    assert body["version"] == 1
    assert body["current"] is True
    assert body["sha256"] == sha256_of(weights)
    assert body["size"] == weights.stat().st_size
    assert body["classes"] == [str(d) for d in range(10)]
    assert body["classes_forgotten"] == [] and body["deletion_requests"] == []
    assert body["superseded_at"] is None and body["disposed_at"] is None
    assert body["download_url"] == "/models/digits/versions/1/weights"


def test_registered_weights_are_stored_content_addressed(client, admin, backend, digits_model):
    body = register_digits(client, admin, digits_model).json()
    stored = backend.settings.artifacts / body["sha256"][:2] / f"{body['sha256']}.safetensors"
    assert stored.read_bytes() == (digits_model / "model.safetensors").read_bytes()
    incoming = backend.settings.artifacts / ".incoming"
    assert not incoming.exists() or list(incoming.iterdir()) == []


def test_a_model_may_be_registered_with_an_eval_set_inside_the_data_roots(client, admin, backend, digits, digits_model):
    response = register_digits(client, admin, digits_model, eval_set=f"file://{digits.val}")
    assert response.status_code == 201, response.text
    with session_scope(backend.settings.database) as session:
        model = session.scalar(select(RegisteredModel).where(RegisteredModel.name == "digits"))
        assert model.eval_set_uri == f"file://{digits.val}"


def test_a_64_character_name_is_accepted(client, admin, digits_model):
    name = "a" + "b" * 63
    response = register_digits(client, admin, digits_model, name=name)
    assert response.status_code == 201, response.text
    assert response.headers["location"] == f"/models/{name}/versions/1"


@pytest.mark.parametrize("name", ["Bad Name", "current", "../x", "a" * 65, "-leading-dash", ".hidden", "UPPER",
                                  "a/b", "naïve"],
                         ids=["space and capitals", "reserved", "traversal", "65 chars", "leading dash", "leading dot",
                              "capitals", "slash", "non-ascii"])
def test_a_bad_model_name_is_refused_with_422(client, admin, backend, digits_model, name):
    assert_problem(post_model(client, admin, name=name, package=digits_model), 422)
    assert_nothing_registered(backend)


def test_a_duplicate_name_is_409(client, admin, backend, digits_model, registered):
    problem = assert_problem(register_digits(client, admin, digits_model), 409, "conflict")
    assert "digits" in problem["detail"]
    with session_scope(backend.settings.database) as session:
        assert len(session.scalars(select(ModelVersion)).all()) == 1


def test_a_card_that_is_not_json_is_refused(client, admin, backend, digits_model):
    response = post_model(client, admin, card=b"architecture: vit\n{", package=digits_model)
    assert_problem(response, 422, "invalid_model_package")
    assert_nothing_registered(backend)


def test_a_card_that_is_not_utf8_is_refused(client, admin, backend, digits_model):
    assert_problem(post_model(client, admin, card=b"\xff\xfe\x00{", package=digits_model), 422, "invalid_model_package")
    assert_nothing_registered(backend)


@pytest.mark.parametrize("card", [b"[]", b"null", b'"a string"', b"{}"], ids=["list", "null", "string", "empty object"])
def test_a_card_that_is_not_a_card_object_is_refused(client, admin, backend, digits_model, card):
    assert_problem(post_model(client, admin, card=card, package=digits_model), 422, "invalid_model_package")
    assert_nothing_registered(backend)


def test_a_card_with_an_unknown_architecture_is_refused(client, admin, backend, digits_model):
    card = card_with(digits_model, architecture="no_such_vit_9000")
    problem = assert_problem(post_model(client, admin, card=card, package=digits_model), 422, "invalid_model_package")
    assert "no_such_vit_9000" in problem["detail"]
    assert_nothing_registered(backend)


def test_a_card_with_kwargs_the_architecture_rejects_is_refused(client, admin, backend, digits_model):
    card = card_with(digits_model, kwargs__no_such_option=1)
    assert_problem(post_model(client, admin, card=card, package=digits_model), 422, "invalid_model_package")
    assert_nothing_registered(backend)


def test_a_card_whose_kwargs_make_timm_divide_by_zero_is_refused(client, admin, backend, digits_model):
    card = card_with(digits_model, kwargs__patch_size=0)
    assert_problem(post_model(client, admin, card=card, package=digits_model), 422, "invalid_model_package")


@pytest.mark.parametrize("weights", [os.urandom(4096), b"", b"\x00" * 8, (10**12).to_bytes(8, "little") + b"{}",
                                     b"PK\x03\x04 a zip / torch pickle"],
                         ids=["random bytes", "empty", "zero header length", "absurd header length", "pickle zip"])
def test_weights_that_are_not_safetensors_are_refused(client, admin, backend, digits_model, weights):
    problem = assert_problem(post_model(client, admin, weights=weights, package=digits_model), 422,
                             "invalid_model_package")
    assert str(backend.settings.artifacts) not in problem["detail"], "the detail leaks a server path"
    assert_nothing_registered(backend)


def test_weights_that_do_not_fit_the_card_are_refused(client, admin, backend, digits_model):
    card = card_with(digits_model, kwargs__embed_dim=32)
    problem = assert_problem(post_model(client, admin, card=card, package=digits_model), 422, "invalid_model_package")
    assert "do not fit" in problem["detail"]
    assert_nothing_registered(backend)


def test_weights_for_a_different_number_of_classes_are_refused(client, admin, backend, digits_model):
    card = card_with(digits_model, classes=[str(d) for d in range(9)])
    assert_problem(post_model(client, admin, card=card, package=digits_model), 422, "invalid_model_package")
    assert_nothing_registered(backend)


@pytest.mark.parametrize("eval_set", ["file:///etc", "file://{root}/../../etc", "file://{root}/%2e%2e/%2e%2e/etc",
                                      "https://example.com/val", "s3://bucket/val", "{root}/val", "val"],
                         ids=["outside roots", "dotdot traversal", "encoded traversal", "https", "s3", "no scheme",
                              "relative"])
def test_an_eval_set_outside_the_data_roots_or_not_a_file_uri_is_422(client, admin, backend, digits, digits_model,
                                                                      eval_set):
    response = register_digits(client, admin, digits_model, eval_set=eval_set.format(root=digits.root))
    assert_problem(response, 422)
    assert_nothing_registered(backend)


@pytest.mark.parametrize("field", ["eval_set", "anchor_set"])
@pytest.mark.parametrize("problem_set", ["missing", "empty"])
def test_an_eval_or_anchor_set_that_is_missing_or_holds_no_images_is_422(client, admin, backend, digits, digits_model,
                                                                          field, problem_set):
    """Every run of the model would read it: a broken one would fail each data subject's request later."""
    folder = digits.root / f"{problem_set}-{field}-{backend.name}"
    if problem_set == "empty":
        folder.mkdir(exist_ok=True)
    with open(digits_model / "model.json", "rb") as card, open(digits_model / "model.safetensors", "rb") as weights:
        response = client.post("/models", headers=admin, data={"name": "digits", field: f"file://{folder}"},
                               files={"card": card, "weights": weights})
    problem = assert_problem(response, 422)
    assert problem["detail"].startswith(f"{field}: ") and "Error" not in problem["detail"]
    assert_nothing_registered(backend)


@pytest.mark.parametrize("missing", ["name", "card", "weights"])
def test_a_missing_multipart_field_is_422(client, admin, backend, digits_model, missing):
    data = {"name": "digits"}
    files = {"card": ("model.json", (digits_model / "model.json").read_bytes()),
             "weights": ("model.safetensors", (digits_model / "model.safetensors").read_bytes())}
    data.pop(missing, None)
    files.pop(missing, None)
    problem = assert_problem(client.post("/models", headers=admin, data=data, files=files), 422, "invalid_input")
    assert missing in problem["detail"]
    assert_nothing_registered(backend)


def test_a_json_body_instead_of_multipart_is_422(client, admin, backend):
    assert_problem(client.post("/models", headers=admin, json={"name": "digits"}), 422, "invalid_input")
    assert_nothing_registered(backend)


def test_weights_larger_than_the_upload_limit_are_413(backend, admin, digits_model):
    settings = backend.settings.model_copy(update={"max_upload_bytes": 1024})
    with TestClient(create_app(settings, enqueue=lambda _id: None)) as small:
        response = register_digits(small, admin, digits_model)
    assert_problem(response, 413, "payload_too_large")
    assert_nothing_registered(backend)


# --- GET /models/current -------------------------------------------------------------------------------------------

def test_current_names_the_only_model_without_a_query(client, admin, registered):
    response = client.get("/models/current", headers=admin)
    assert response.status_code == 200, response.text
    assert response.headers["etag"] == f'"{registered["sha256"]}"'
    body = response.json()
    assert body["model"] == "digits" and body["version"] == 1 and body["current"] is True
    assert body["sha256"] == registered["sha256"] and body["size"] == registered["size"]
    assert body["created_at"] == registered["created_at"]
    assert body["download_url"] == "/models/digits/versions/1/weights"
    assert body["deletion_requests"] == [] and body["classes_forgotten"] == []


def test_current_with_the_model_named(client, admin, registered):
    response = client.get("/models/current", headers=admin, params={"model": "digits"})
    assert response.status_code == 200
    assert response.json()["sha256"] == registered["sha256"]
    assert response.headers["etag"] == f'"{registered["sha256"]}"'


@pytest.mark.parametrize("if_none_match", ['"{sha}"', '"other", "{sha}"', '"{sha}", "other"'],
                         ids=["the etag", "in a list", "first in a list"])
def test_current_answers_304_when_the_client_has_it(client, admin, registered, if_none_match):
    response = client.get("/models/current", headers={**admin, "If-None-Match": if_none_match.format(
        sha=registered["sha256"])})
    assert response.status_code == 304
    assert response.content == b""
    assert response.headers["etag"] == f'"{registered["sha256"]}"'


@pytest.mark.parametrize("if_none_match", ["*", 'W/"{sha}"', '"other", W/"{sha}"'],
                         ids=["any version", "weak", "weak in a list"])
def test_current_answers_304_to_a_star_or_a_weak_validator(client, admin, registered, if_none_match):
    # RFC 9110 13.1.2: If-None-Match compares weakly, and * matches whatever version is current.
    response = client.get("/models/current", headers={**admin, "If-None-Match": if_none_match.format(
        sha=registered["sha256"])})
    assert response.status_code == 304
    weights = client.get("/models/digits/versions/1/weights", headers={**admin, "If-None-Match": if_none_match.format(
        sha=registered["sha256"])})
    assert weights.status_code == 304 and weights.content == b""


@pytest.mark.parametrize("if_none_match", ['"0000"', "{sha}", '"{sha}x"'],
                         ids=["another etag", "unquoted", "prefix match"])
def test_current_answers_200_when_the_client_has_another_version(client, admin, registered, if_none_match):
    response = client.get("/models/current", headers={**admin, "If-None-Match": if_none_match.format(
        sha=registered["sha256"])})
    assert response.status_code == 200
    assert response.json()["sha256"] == registered["sha256"]


def test_current_needs_a_name_when_several_models_exist(client, admin, digits_model, registered):
    assert register_digits(client, admin, digits_model, name="digits-b").status_code == 201
    assert_problem(client.get("/models/current", headers=admin), 422, "invalid_input")
    named = client.get("/models/current", headers=admin, params={"model": "digits-b"})
    assert named.status_code == 200 and named.json()["model"] == "digits-b"


def test_current_of_an_unknown_model_is_404(client, admin, registered):
    assert_problem(client.get("/models/current", headers=admin, params={"model": "nope"}), 404, "not_found")


def test_current_with_no_model_registered_is_a_problem_not_a_500(client, admin):
    response = client.get("/models/current", headers=admin)
    assert response.status_code in (404, 422), response.text
    assert response.headers["content-type"].startswith(PROBLEM_JSON)


# --- GET /models/{name}/versions ----------------------------------------------------------------------------------

def test_versions_lists_the_one_registered_version(client, admin, registered):
    response = client.get("/models/digits/versions", headers=admin)
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == "digits"
    assert [v["version"] for v in body["versions"]] == [1]
    assert body["versions"][0] == registered


def test_versions_of_an_unknown_model_is_404(client, admin, registered):
    assert_problem(client.get("/models/nope/versions", headers=admin), 404, "not_found")


@pytest.mark.parametrize(("path", "params"), [("/models/digits%00/versions", None),
                                              ("/models/current", {"model": "digits\x00"}),
                                              ("/models/digits%00/versions/1/weights", None)],
                         ids=["versions", "current", "weights"])
def test_a_nul_in_a_model_name_is_404_not_500(request, client, admin, backend, registered, path, params):
    assert_problem(client.get(path, headers=admin, params=params), 404, "not_found")


# --- GET /models/{name}/versions/{v}/weights -------------------------------------------------------------------------

def test_weights_download_returns_the_exact_bytes_with_the_sha256_etag(client, admin, digits_model, registered):
    response = client.get("/models/digits/versions/1/weights", headers=admin)
    assert response.status_code == 200
    assert response.content == (digits_model / "model.safetensors").read_bytes()
    assert response.headers["etag"] == f'"{registered["sha256"]}"'
    assert response.headers["x-checksum-sha256"] == registered["sha256"]
    assert response.headers["content-type"] == "application/octet-stream"
    assert "model.safetensors" in response.headers["content-disposition"]
    assert response.headers["accept-ranges"] == "bytes"


def test_weights_support_a_byte_range(client, admin, digits_model, registered):
    response = client.get("/models/digits/versions/1/weights", headers={**admin, "Range": "bytes=0-9"})
    assert response.status_code == 206
    assert response.content == (digits_model / "model.safetensors").read_bytes()[:10]
    assert response.headers["content-range"] == f"bytes 0-9/{registered['size']}"
    assert response.headers["etag"] == f'"{registered["sha256"]}"'


def test_weights_support_a_suffix_range(client, admin, digits_model, registered):
    response = client.get("/models/digits/versions/1/weights", headers={**admin, "Range": "bytes=-16"})
    assert response.status_code == 206
    assert response.content == (digits_model / "model.safetensors").read_bytes()[-16:]


@pytest.mark.parametrize("byte_range", ["bytes=abc", "items=0-5", "bytes=9-2", "bytes=", "bytes=0-1,4-5"])
def test_a_range_that_is_not_one_byte_range_is_ignored_and_the_whole_file_sent(client, admin, digits_model,
                                                                                registered, byte_range):
    # RFC 9110 14.2 lets a server ignore a Range it does not take; before, these were 400 text/plain.
    response = client.get("/models/digits/versions/1/weights", headers={**admin, "Range": byte_range})
    assert response.status_code == 200
    assert response.content == (digits_model / "model.safetensors").read_bytes()


def test_an_unsatisfiable_range_is_416_not_500(client, admin, registered):
    start = registered["size"] + 10
    response = client.get("/models/digits/versions/1/weights", headers={**admin, "Range": f"bytes={start}-{start + 5}"})
    assert response.status_code == 416


@pytest.mark.parametrize(("path", "status"), [("/models/digits/versions/99/weights", 404),
                                              ("/models/nope/versions/1/weights", 404),
                                              ("/models/digits/versions/0/weights", 404),
                                              ("/models/digits/versions/-1/weights", 404),
                                              (f"/models/digits/versions/{10**22}/weights", 404),
                                              ("/models/digits/versions/one/weights", 422)],
                         ids=["version 99", "unknown model", "version 0", "negative version", "version 10^22",
                              "not a number"])
def test_weights_of_a_version_that_does_not_exist(client, admin, registered, path, status):
    assert_problem(client.get(path, headers=admin), status)


def test_weights_of_a_disposed_version_are_410_while_the_record_stays(client, admin, backend, registered):
    with session_scope(backend.settings.database) as session:
        version = session.scalar(select(ModelVersion).where(ModelVersion.version == 1))
        version.superseded_at = version.disposed_at = utcnow()

    problem = assert_problem(client.get("/models/digits/versions/1/weights", headers=admin), 410, "gone")
    assert registered["sha256"] in problem["detail"]
    listed = client.get("/models/digits/versions", headers=admin).json()["versions"][0]
    assert listed["sha256"] == registered["sha256"] and listed["size"] == registered["size"]
    assert listed["disposed_at"] is not None
    assert listed["download_url"] is None
