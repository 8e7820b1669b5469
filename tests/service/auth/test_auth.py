"""API keys: every endpoint but health and readiness needs a key (401), with the right scope (403); keys are stored hashed."""

from __future__ import annotations

import hashlib
import uuid

import pytest
from sqlalchemy import select

from service.auth.models import ApiKey
from service.auth.service import SCOPES, create_key, revoke_key
from service.db import session_scope
from service.errors import InvalidInput
from tests.service.conftest import make_key, register_digits, request_body

PROBLEM_JSON = "application/problem+json"
SOME_ID = "00000000-0000-4000-8000-000000000000"

# (method, path, scope the endpoint needs, JSON body to send)
ENDPOINTS = [
    ("POST", "/models", "models:write", None),
    ("GET", "/models/current", "models:read", None),
    ("GET", "/models/digits/versions", "models:read", None),
    ("GET", "/models/digits/versions/1/weights", "models:read", None),
    ("POST", "/deletion-requests", "requests:write", {"external_id": "s", "model": "digits", "forget_class": "3",
                                                      "forget_set": {"uri": "file:///nowhere"}}),
    ("GET", "/deletion-requests", "requests:read", None),
    ("GET", f"/deletion-requests/{SOME_ID}", "requests:read", None),
    ("POST", f"/deletion-requests/{SOME_ID}/cancel", "requests:write", None),
    ("POST", f"/deletion-requests/{SOME_ID}/retry", "requests:write", None),
    ("POST", f"/deletion-requests/{SOME_ID}/extend", "requests:write", {"days": 10, "reason": "complex request"}),
]
ENDPOINT_IDS = [f"{method} {path.replace(SOME_ID, '{id}')}" for method, path, _, _ in ENDPOINTS]

BAD_CREDENTIALS = {
    "no Authorization header": {},
    "an empty bearer token": {"Authorization": "Bearer "},
    "a garbage key": {"Authorization": "Bearer lethe_not-a-real-key-at-all"},
    "a key of the right shape that was never issued": {"Authorization": "Bearer lethe_" + "A" * 43},
    "another scheme": {"Authorization": "Basic dXNlcjpwYXNz"},
}


def call(client, method: str, path: str, headers: dict[str, str], body: dict | None = None):
    return client.request(method, path, headers=headers, json=body)


def assert_problem(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM_JSON)
    problem = response.json()
    assert problem["status"] == status
    assert problem["code"] == code
    assert problem["title"] and problem["detail"] and problem["type"].endswith(code)
    return problem


@pytest.mark.parametrize(("method", "path", "scope", "body"), ENDPOINTS, ids=ENDPOINT_IDS)
def test_every_endpoint_answers_401_problem_without_a_valid_key(client, method, path, scope, body):
    for label, headers in BAD_CREDENTIALS.items():
        response = call(client, method, path, headers, body)
        assert_problem(response, 401, "unauthenticated")
        assert response.headers["www-authenticate"] == "Bearer", label


@pytest.mark.parametrize(("method", "path", "scope", "body"), ENDPOINTS, ids=ENDPOINT_IDS)
def test_every_endpoint_answers_403_to_a_key_with_every_scope_but_the_one_it_needs(client, backend, method, path,
                                                                                    scope, body):
    others = [s for s in SCOPES if s not in (scope, "admin")]
    response = call(client, method, path, make_key(backend.settings, *others), body)
    problem = assert_problem(response, 403, "forbidden")
    assert problem["required_scope"] == scope
    assert "www-authenticate" not in response.headers


@pytest.mark.parametrize(("method", "path", "scope", "body"), ENDPOINTS, ids=ENDPOINT_IDS)
def test_a_key_of_the_other_family_is_forbidden(client, backend, method, path, scope, body):
    family = "models:" if scope.startswith("requests:") else "requests:"
    key = make_key(backend.settings, family + "read", family + "write")
    assert_problem(call(client, method, path, key, body), 403, "forbidden")


@pytest.mark.parametrize(("method", "path", "scope", "body"), ENDPOINTS, ids=ENDPOINT_IDS)
def test_the_one_scope_an_endpoint_needs_is_enough_to_pass_auth(client, backend, method, path, scope, body):
    response = call(client, method, path, make_key(backend.settings, scope), body)
    # No model or request exists, so the endpoint answers 404/422; what matters is that auth let it through.
    assert response.status_code not in (401, 403, 500), response.text


def test_admin_works_on_every_endpoint(client, admin, digits, digits_model):
    registered = register_digits(client, admin, digits_model)
    assert registered.status_code == 201, registered.text
    accepted = client.post("/deletion-requests", headers=admin, json=request_body(digits))
    assert accepted.status_code == 202, accepted.text
    request_id = accepted.json()["id"]

    assert client.get("/models/current", headers=admin).status_code == 200
    assert client.get("/models/digits/versions", headers=admin).status_code == 200
    assert client.get("/models/digits/versions/1/weights", headers=admin).status_code == 200
    assert client.get("/deletion-requests", headers=admin).status_code == 200
    assert client.get(f"/deletion-requests/{request_id}", headers=admin).status_code == 200
    extended = client.post(f"/deletion-requests/{request_id}/extend", headers=admin,
                           json={"days": 10, "reason": "complex request"})
    assert extended.status_code == 200, extended.text
    # retry needs a failed request: a queued one is a state conflict, not an auth failure
    assert_problem(client.post(f"/deletion-requests/{request_id}/retry", headers=admin), 409, "invalid_transition")
    assert client.post(f"/deletion-requests/{request_id}/cancel", headers=admin).status_code == 200


def test_a_revoked_key_gets_401(client, backend):
    name = f"revoked-{uuid.uuid4().hex[:8]}"
    with session_scope(backend.settings.database) as session:
        _row, key = create_key(session=session, name=name, scopes=["admin"])
    headers = {"Authorization": f"Bearer {key}"}
    assert client.get("/deletion-requests", headers=headers).status_code == 200

    with session_scope(backend.settings.database) as session:
        revoke_key(session=session, name=name)

    for method, path, _scope, body in ENDPOINTS:
        response = call(client, method, path, headers, body)
        assert_problem(response, 401, "unauthenticated")
        assert response.headers["www-authenticate"] == "Bearer"


def test_a_key_with_surrounding_whitespace_is_still_the_same_key(client, backend):
    headers = make_key(backend.settings, "requests:read")
    padded = {"Authorization": headers["Authorization"] + "  "}
    assert client.get("/deletion-requests", headers=padded).status_code == 200


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
def test_health_and_readiness_need_no_key(client, path):
    response = client.get(path)
    assert response.status_code == 200, response.text


def test_readiness_reports_its_checks(client):
    assert client.get("/readyz").json() == {"status": "ready",
                                            "checks": {"database": "ok", "broker": "ok", "artifacts": "ok"}}


def test_keys_are_stored_only_as_a_sha256_hash(backend):
    with session_scope(backend.settings.database) as session:
        row, key = create_key(session=session, name="hashed", scopes=["requests:read", "models:read"])
        key_id = row.id
    with session_scope(backend.settings.database) as session:
        stored = session.get(ApiKey, key_id)
        assert stored.key_sha256 == hashlib.sha256(key.encode()).hexdigest()
        assert stored.key_sha256 != key
        columns = {c.key: getattr(stored, c.key) for c in ApiKey.__table__.columns}
        assert all(key not in str(value) for value in columns.values()), columns
        assert len(stored.prefix) < len(key) and key.startswith(stored.prefix)
        assert stored.scopes == ["models:read", "requests:read"]
        assert stored.revoked_at is None


def test_each_key_is_different(backend):
    with session_scope(backend.settings.database) as session:
        keys = {create_key(session=session, name=f"k{i}", scopes=["admin"])[1] for i in range(5)}
    assert len(keys) == 5


@pytest.mark.parametrize("scopes", [["requests:delete"], ["admin", "root"], ["*"], []],
                         ids=["unknown scope", "one unknown among known", "wildcard", "no scope"])
def test_create_key_refuses_unknown_or_missing_scopes(backend, scopes):
    with pytest.raises(InvalidInput):
        with session_scope(backend.settings.database) as session:
            create_key(session=session, name="refused", scopes=scopes)
    with session_scope(backend.settings.database) as session:
        assert session.scalar(select(ApiKey).where(ApiKey.name == "refused")) is None


def test_create_key_refuses_a_duplicate_name(backend):
    with session_scope(backend.settings.database) as session:
        create_key(session=session, name="twice", scopes=["admin"])
    with pytest.raises(InvalidInput):
        with session_scope(backend.settings.database) as session:
            create_key(session=session, name="twice", scopes=["admin"])
