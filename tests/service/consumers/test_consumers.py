"""A model's consumers: registered by an operator, each acknowledging with its own key the version
it serves (checked against the registry), every acknowledgement kept; a consumer behind current is
lagging (embedded default and Postgres)."""

from __future__ import annotations

import pytest

from service.auth.service import authenticate
from service.db import session_scope
from service.registry.models import RegisteredModel
from service.registry.service import publish_version
from tests.service_fixtures import make_key, registered_digits


@pytest.fixture
def model(client, admin, digits_model) -> dict:
    return registered_digits(client, admin, digits_model)


@pytest.fixture
def inference(backend) -> tuple[str, dict[str, str]]:
    """An inference service's key (models:read only), and its name."""
    headers = make_key(backend.settings, "models:read")
    with session_scope(backend.settings.database) as session:
        name = authenticate(session=session, token=headers["Authorization"].removeprefix("Bearer ")).name
    return name, headers


def add(client, admin, consumer: str, key_name: str):
    return client.post("/models/digits/consumers", headers=admin, json={"name": consumer, "api_key": key_name})


def test_a_registered_consumer_serves_nothing_until_it_acknowledges(client, admin, model, inference):
    key_name, _ = inference
    response = add(client, admin, "search-api", key_name)
    assert response.status_code == 201
    assert response.json()["serving"] is None and response.json()["lagging"] is True
    assert [c["name"] for c in client.get("/models/digits/consumers", headers=admin).json()] == ["search-api"]


@pytest.mark.parametrize("body, status", [({"name": "x y", "api_key": "k"}, 422), ({"name": "a"}, 422),
                                          ({"name": "a", "api_key": "no-such-key"}, 422)])
def test_a_bad_consumer_is_refused_and_nothing_is_registered(client, admin, model, body, status):
    assert client.post("/models/digits/consumers", headers=admin, json=body).status_code == status
    assert client.get("/models/digits/consumers", headers=admin).json() == []


def test_a_consumer_name_is_unique_per_model(client, admin, model, inference):
    assert add(client, admin, "search-api", inference[0]).status_code == 201
    assert add(client, admin, "search-api", inference[0]).status_code == 409


def test_its_own_key_acknowledges_the_version_it_serves_checked_against_the_registry(client, admin, model,
                                                                                      inference, backend):
    key_name, headers = inference
    add(client, admin, "search-api", key_name)
    ack = client.put("/models/digits/consumers/search-api", headers=headers,
                     json={"version": 1, "sha256": model["sha256"]})
    assert ack.status_code == 200 and ack.json()["version"] == 1 and ack.json()["by"] == key_name
    (listed,) = client.get("/models/digits/consumers", headers=admin).json()
    assert listed["serving"]["version"] == 1 and listed["lagging"] is False
    wrong = client.put("/models/digits/consumers/search-api", headers=headers, json={"version": 1, "sha256": "0" * 64})
    assert wrong.status_code == 422 and wrong.json()["code"] == "version_mismatch"
    assert client.put("/models/digits/consumers/search-api", headers=headers,
                      json={"version": 7, "sha256": model["sha256"]}).status_code == 422
    other = make_key(backend.settings, "models:read")
    assert client.put("/models/digits/consumers/search-api", headers=other,
                      json={"version": 1, "sha256": model["sha256"]}).status_code == 403
    assert client.put("/models/digits/consumers/nobody", headers=headers,
                      json={"version": 1, "sha256": model["sha256"]}).status_code == 404


def test_a_consumer_behind_current_is_lagging_and_its_history_says_from_when_to_when(client, admin, model,
                                                                                     inference, backend):
    key_name, headers = inference
    add(client, admin, "search-api", key_name)
    client.put("/models/digits/consumers/search-api", headers=headers, json={"version": 1, "sha256": model["sha256"]})
    with session_scope(backend.settings.database) as session:
        model_id = session.query(RegisteredModel.id).scalar()
        v2 = publish_version(session=session, model_id=model_id, sha256="ab" * 32, size=1, card={},
                             classes_forgotten=["3"], metrics={})
        v2_sha = v2.sha256
    (listed,) = client.get("/models/digits/consumers", headers=admin).json()
    assert listed["serving"]["version"] == 1 and listed["lagging"] is True
    assert client.put("/models/digits/consumers/search-api", headers=headers,
                      json={"version": 2, "sha256": v2_sha}).status_code == 200
    first, second = client.get("/models/digits/consumers/search-api/acknowledgements", headers=admin).json()
    assert (first["version"], second["version"]) == (1, 2)
    assert first["until"] == second["since"] and second["until"] is None
    assert client.get("/models/digits/consumers", headers=admin).json()[0]["lagging"] is False
