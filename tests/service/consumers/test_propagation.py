"""A completed request is done only when no consumer of its model still serves a version that
holds the class: it becomes ``propagated`` once every live consumer acknowledged the version that
fulfilled it or a later one; at once when the model has none, and says so. Its deadline counts
until then (embedded default and Postgres)."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import select

from service.auth.service import authenticate
from service.consumers.propagation import NO_CONSUMERS, propagate
from service.db import session_factory, session_scope
from service.deletion_requests.models import AuditEvent, DeletionRequest, RequestStatus as S
from service.deletion_requests.transitions import transition
from service.registry.models import RegisteredModel
from service.registry.service import current_version, publish_version
from service.webhooks.models import WebhookDelivery
from tests.service.deletion_requests.test_races import only_on_postgres, waiting_for_a_lock
from tests.service_fixtures import make_key, registered_digits, request_body, with_env
from worker.runs.sweep import sweep


@pytest.fixture
def model(client, admin, digits_model) -> dict:
    return registered_digits(client, admin, digits_model)


@pytest.fixture
def backend(backend):
    """Each backend with 127.0.0.1 allowed as a webhook target: the outbox shows the event."""
    return with_env(backend, LETHE_WEBHOOK_ALLOWED_HOSTS="127.0.0.1")


def consumer(client, admin, backend, name: str) -> dict[str, str]:
    """A registered consumer of the digits model, and its own key's headers."""
    headers = make_key(backend.settings, "models:read")
    assert client.post("/models/digits/consumers", headers=admin,
                       json={"name": name, "api_key": key_name(backend, headers)}).status_code == 201
    return headers


def key_name(backend, headers: dict[str, str]) -> str:
    with session_scope(backend.settings.database) as session:
        return authenticate(session=session, token=headers["Authorization"].removeprefix("Bearer ")).name


def completed_by_a_new_version(backend, request_id: str, *, then_propagate: bool = True) -> dict:
    """What a worker's settle does, without the training: version n+1 published, the request
    completed by it, and the propagation check in the same transaction."""
    with session_scope(backend.settings.database) as session:
        row = session.get(DeletionRequest, request_id)
        transition(session=session, request=row, to=S.RUNNING, actor="worker:w")
        parent = current_version(session=session, model=row.model)
        version = publish_version(session=session, model_id=row.model_id, sha256=f"{parent.version + 1:064x}",
                                  size=1, card=parent.card, classes_forgotten=[*parent.classes_forgotten, row.forget_class],
                                  metrics={})
        row.fulfilled_version_id = version.id
        transition(session=session, request=row, to=S.COMPLETED, actor="worker:w")
        if then_propagate:
            propagate(session=session, model_id=row.model_id, actor="worker:w")
        return {"version": version.version, "sha256": version.sha256}


def ack(client, headers, name: str, version: dict):
    response = client.put(f"/models/digits/consumers/{name}", headers=headers, json=version)
    assert response.status_code == 200, response.text
    return response


def submitted(client, admin, digits, external_id: str = "subject-1", forget_class: str = "3") -> str:
    response = client.post("/deletion-requests", headers=admin,
                           json=request_body(digits, external_id=external_id, forget_class=forget_class))
    assert response.status_code in (201, 202), response.text
    return response.json()["id"]


def status(client, admin, request_id: str) -> dict:
    return client.get(f"/deletion-requests/{request_id}", headers=admin).json()


def events(backend, request_id: str) -> list[AuditEvent]:
    with session_scope(backend.settings.database) as session:
        found = session.scalars(select(AuditEvent).where(AuditEvent.request_id == request_id)
                                .order_by(AuditEvent.id)).all()
        session.expunge_all()
        return found


def test_a_model_without_consumers_propagates_at_once_and_says_so(backend, client, admin, model, digits):
    request_id = submitted(client, admin, digits)
    completed_by_a_new_version(backend, request_id)
    body = status(client, admin, request_id)
    assert body["status"] == "propagated" and body["days_left"] is None
    last = events(backend, request_id)[-1]
    assert (last.event, last.from_status) == ("status:propagated", "completed")
    assert last.detail == {"version": 2, "consumers": [], "note": NO_CONSUMERS}


def test_it_propagates_only_when_every_consumer_serves_the_version_and_the_deadline_counts_until_then(
        backend, client, admin, model, digits):
    search, ranking = consumer(client, admin, backend, "search"), consumer(client, admin, backend, "ranking")
    hook = client.post("/webhooks", headers=admin, json={"url": "http://127.0.0.1:9/hook",
                                                        "events": ["deletion_request.propagated"]})
    assert hook.status_code == 201, hook.text
    request_id = submitted(client, admin, digits)
    v2 = completed_by_a_new_version(backend, request_id)
    body = status(client, admin, request_id)
    assert body["status"] == "completed" and body["days_left"] is not None  # the deadline still counts
    ack(client, search, "search", v2)
    ack(client, ranking, "ranking", {"version": 1, "sha256": model["sha256"]})  # still the old one
    assert status(client, admin, request_id)["status"] == "completed"
    ack(client, ranking, "ranking", v2)
    body = status(client, admin, request_id)
    assert body["status"] == "propagated" and body["days_left"] is None
    last = events(backend, request_id)[-1]
    assert last.actor == "consumer:ranking"
    assert [(c["consumer"], c["confirmed"], c["version"]) for c in last.detail["consumers"]] == [
        ("search", True, 2), ("ranking", True, 2)]
    with session_scope(backend.settings.database) as session:  # one webhook event, in the same transaction
        assert session.scalars(select(WebhookDelivery.event_type).where(
            WebhookDelivery.webhook_id == hook.json()["id"])).all() == ["deletion_request.propagated"]


def test_a_later_version_carries_every_earlier_erasure(backend, client, admin, model, digits):
    search = consumer(client, admin, backend, "search")
    first, second = submitted(client, admin, digits), submitted(client, admin, digits, "subject-2", "5")
    completed_by_a_new_version(backend, first)
    v3 = completed_by_a_new_version(backend, second)
    ack(client, search, "search", v3)  # it skipped v2
    assert [status(client, admin, r)["status"] for r in (first, second)] == ["propagated", "propagated"]


def test_a_consumer_back_on_an_older_version_does_not_count(backend, client, admin, model, digits):
    search, ranking = consumer(client, admin, backend, "search"), consumer(client, admin, backend, "ranking")
    request_id = submitted(client, admin, digits)
    v2 = completed_by_a_new_version(backend, request_id)
    ack(client, search, "search", v2)
    ack(client, search, "search", {"version": 1, "sha256": model["sha256"]})  # rolled back: serves the class again
    ack(client, ranking, "ranking", v2)
    assert status(client, admin, request_id)["status"] == "completed"


def test_removing_the_consumer_it_waited_for_propagates_it_and_keeps_its_history(backend, client, admin, model, digits):
    search = consumer(client, admin, backend, "search")
    retired = consumer(client, admin, backend, "retired")
    request_id = submitted(client, admin, digits)
    v2 = completed_by_a_new_version(backend, request_id)
    ack(client, search, "search", v2)
    assert status(client, admin, request_id)["status"] == "completed"
    reader = make_key(backend.settings, "models:read")
    assert client.delete("/models/digits/consumers/retired", headers=reader).status_code == 403
    assert client.delete("/models/digits/consumers/retired", headers=admin).status_code == 204
    assert status(client, admin, request_id)["status"] == "propagated"
    assert [c["name"] for c in client.get("/models/digits/consumers", headers=admin).json()] == ["search"]
    assert client.get("/models/digits/consumers/retired/acknowledgements", headers=admin).status_code == 200
    assert client.delete("/models/digits/consumers/retired", headers=admin).status_code == 404
    # The same service back: awaited again by the next request, its history goes on.
    back = client.post("/models/digits/consumers", headers=admin,
                       json={"name": "retired", "api_key": key_name(backend, retired)})
    assert back.status_code == 201 and back.json()["serving"] is None
    later = submitted(client, admin, digits, "subject-2", "5")
    v3 = completed_by_a_new_version(backend, later)
    ack(client, search, "search", v3)
    assert status(client, admin, later)["status"] == "completed"
    ack(client, retired, "retired", v3)
    assert status(client, admin, later)["status"] == "propagated"


def test_a_completed_request_can_be_extended_until_it_propagates(backend, client, admin, model, digits):
    consumer(client, admin, backend, "search")
    request_id = submitted(client, admin, digits)
    completed_by_a_new_version(backend, request_id)
    extend = {"days": 10, "reason": "the search cluster is frozen for a release"}
    assert client.post(f"/deletion-requests/{request_id}/extend", headers=admin, json=extend).status_code == 200
    assert client.delete("/models/digits/consumers/search", headers=admin).status_code == 204
    refused = client.post(f"/deletion-requests/{request_id}/extend", headers=admin, json=extend)
    assert refused.status_code == 409 and refused.json()["current_status"] == "propagated"


def test_the_sweep_propagates_what_no_completion_or_acknowledgement_moved(backend, client, admin, model, digits):
    request_id = submitted(client, admin, digits)
    completed_by_a_new_version(backend, request_id, then_propagate=False)  # e.g. completed before this release
    assert status(client, admin, request_id)["status"] == "completed"
    assert sweep(backend.settings, enqueue=lambda _id: None)["propagated"] == 1
    assert status(client, admin, request_id)["status"] == "propagated"
    assert events(backend, request_id)[-1].actor == "sweep"


def test_two_consumers_acknowledging_at_once_propagate_it(backend, client, admin, model, digits):
    """Each acknowledgement alone sees only its own: without the model's lock, both would leave
    the request completed for ever (write skew)."""
    only_on_postgres(backend)
    consumer(client, admin, backend, "search")
    consumer(client, admin, backend, "ranking")
    request_id = submitted(client, admin, digits)
    v2 = completed_by_a_new_version(backend, request_id)
    from service.consumers import service as consumers
    from service.auth.models import ApiKey

    def acknowledge(session, name: str) -> None:
        model_row = session.scalar(select(RegisteredModel))
        row = consumers.get(session=session, model=model_row, name=name)
        key = session.scalar(select(ApiKey).where(ApiKey.name == row.api_key_name))
        consumers.acknowledge(session=session, model=model_row, consumer=row, key=key, **v2)

    first = session_factory(backend.settings.database)()
    try:
        acknowledge(first, "search")  # holds the model's row, its acknowledgement not committed
        second = threading.Thread(target=lambda: _in_a_transaction(backend, acknowledge, "ranking"))
        second.start()
        for _ in range(500):
            if waiting_for_a_lock(backend.settings):
                break
            threading.Event().wait(0.01)
        else:
            pytest.fail("the second acknowledgement never waited for the model's lock")
        first.commit()
    finally:
        first.close()
    second.join(timeout=30)
    assert status(client, admin, request_id)["status"] == "propagated"


def _in_a_transaction(backend, work, *args) -> None:
    with session_scope(backend.settings.database) as session:
        work(session, *args)


def test_a_consumer_back_on_an_older_version_after_propagation_is_on_the_record(backend, client, admin, model, digits):
    search = consumer(client, admin, backend, "search")
    request_id = submitted(client, admin, digits)
    v2 = completed_by_a_new_version(backend, request_id)
    ack(client, search, "search", v2)
    assert status(client, admin, request_id)["status"] == "propagated"
    ack(client, search, "search", {"version": 1, "sha256": model["sha256"]})  # a rollback: the class is served again
    last = events(backend, request_id)[-1]
    assert (last.event, last.detail, last.actor) == ("served_again", {"consumer": "search", "version": 1},
                                                     "consumer:search")
    with session_scope(backend.settings.database) as session:
        from service.certificates.document import statements
        said = statements(session, session.get(DeletionRequest, request_id), "https://lethe.test")
    assert said["serving"]["propagated"] is True and said["serving"]["served_again"][0]["version"] == 1


def test_a_consumer_registered_again_serves_nothing_until_it_acknowledges_again(backend, client, admin, model, digits):
    search = consumer(client, admin, backend, "search")
    ack(client, search, "search", {"version": 1, "sha256": model["sha256"]})
    assert client.delete("/models/digits/consumers/search", headers=admin).status_code == 204
    assert client.post("/models/digits/consumers", headers=admin,
                       json={"name": "search", "api_key": key_name(backend, search)}).json()["serving"] is None
    assert len(client.get("/models/digits/consumers/search/acknowledgements", headers=admin).json()) == 1  # kept


def test_a_consumer_needs_a_key_that_can_read_models(backend, client, admin, model):
    writer = make_key(backend.settings, "requests:write")
    response = client.post("/models/digits/consumers", headers=admin,
                           json={"name": "search", "api_key": key_name(backend, writer)})
    assert response.status_code == 422 and "models:read" in response.json()["detail"]
