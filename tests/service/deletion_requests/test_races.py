"""A request's status changes are compare-and-set: a caller and a worker racing on one request
never both win, and a change read from a stale row is refused, not written over the newer one.

The races are made deterministic with two real sessions interleaved by hand (and, for a writer
that must wait for another's lock, a check that Postgres shows it waiting), never with sleeps.
On the embedded default every transaction takes SQLite's write lock at its first statement
(``BEGIN IMMEDIATE``), so two writers never interleave there: the stale-row tests are Postgres's.
"""

from __future__ import annotations

import threading

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.orm.exc import StaleDataError

from service.config import Settings
from service.db import session_factory, session_scope
from service.deletion_requests import service
from service.deletion_requests.models import DeletionRequest, RequestStatus as S
from service.deletion_requests.schemas import ExtendBody
from service.deletion_requests.transitions import transition
from service.errors import InvalidInput, install_error_handlers
from service.registry.models import RegisteredModel
from tests.service_fixtures import register_digits, request_body
from worker.runs.leases import claim_batch


@pytest.fixture
def queued(backend, client, admin, digits, digits_model) -> str:
    assert register_digits(client, admin, digits_model).status_code == 201
    return client.post("/deletion-requests", headers=admin, json=request_body(digits)).json()["id"]


def model_id(settings: Settings) -> str:
    with session_scope(settings.database) as session:
        return session.query(RegisteredModel.id).scalar()


def only_on_postgres(backend) -> None:
    if backend.name != "postgres":
        pytest.skip("SQLite serialises writers from their first statement (BEGIN IMMEDIATE): no interleaving")


def test_a_status_read_before_a_concurrent_change_cannot_be_written_over_it(backend, queued):
    only_on_postgres(backend)
    stale = session_factory(backend.settings.database)()
    try:
        row = stale.get(DeletionRequest, queued)  # the caller reads "queued" ...
        with session_scope(backend.settings.database) as worker:  # ... a worker claims it meanwhile ...
            transition(session=worker, request=worker.get(DeletionRequest, queued), to=S.RUNNING, actor="worker:w")
        with pytest.raises(StaleDataError):  # ... and the caller's cancel of a "queued" request is refused
            service.cancel(session=stale, request=row, actor="api-key:k", reason=None)
    finally:
        stale.rollback()
        stale.close()
    with session_scope(backend.settings.database) as session:
        assert session.get(DeletionRequest, queued).status == S.RUNNING


def test_a_cancel_racing_the_claim_either_cancels_it_or_asks_the_run_to_stop(backend, queued):
    only_on_postgres(backend)
    caller = session_factory(backend.settings.database)()
    try:
        row = service.get_request(session=caller, request_id=queued, for_update=True)
        assert row.status == S.QUEUED
        # A worker claims while the caller holds the row: it skips it instead of waiting or taking it.
        assert claim_batch(backend.settings, model_id(backend.settings), "w") is None
        service.cancel(session=caller, request=row, actor="api-key:k", reason=None)
        caller.commit()
    finally:
        caller.close()
    with session_scope(backend.settings.database) as session:
        assert session.get(DeletionRequest, queued).status == S.CANCELED


def test_a_cancel_after_the_claim_asks_the_run_to_stop(backend, queued):
    batch = claim_batch(backend.settings, model_id(backend.settings), "w")
    assert batch is not None and queued in batch.requests
    with session_scope(backend.settings.database) as session:
        row = service.get_request(session=session, request_id=queued, for_update=True)
        service.cancel(session=session, request=row, actor="api-key:k", reason=None)
    with session_scope(backend.settings.database) as session:
        row = session.get(DeletionRequest, queued)
        assert (row.status, row.cancel_requested) == (S.RUNNING, True)


def waiting_for_a_lock(settings: Settings) -> bool:
    with session_scope(settings.database) as session:
        return bool(session.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )).scalar())


def test_two_extensions_at_once_cannot_pass_the_cap_together(backend, queued):
    only_on_postgres(backend)
    settings = backend.settings
    days = settings.max_extension_days // 2 + 1  # each alone fits; both do not
    first = session_factory(settings.database)()
    outcome: list[object] = []

    def second_extension() -> None:
        try:
            with session_scope(settings.database) as session:
                row = service.get_request(session=session, request_id=queued, for_update=True)
                service.extend(session=session, settings=settings, request=row,
                               body=ExtendBody(days=days, reason="complex request"), actor="api-key:b")
            outcome.append("extended")
        except InvalidInput as exc:
            outcome.append(exc)

    try:
        row = service.get_request(session=first, request_id=queued, for_update=True)
        service.extend(session=first, settings=settings, request=row, body=ExtendBody(days=days, reason="complex"),
                       actor="api-key:a")
        other = threading.Thread(target=second_extension)
        other.start()
        for _ in range(500):  # until Postgres shows the second one waiting for the row
            if waiting_for_a_lock(settings):
                break
            other.join(0.01)
        else:
            pytest.fail("the second extension never waited for the first one's lock")
        first.commit()
    finally:
        first.close()
    other.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], InvalidInput), outcome
    with session_scope(settings.database) as session:
        assert session.get(DeletionRequest, queued).extended_days == days


def test_a_lost_race_is_a_409_conflict_problem():
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/race")
    def race():
        raise StaleDataError("UPDATE statement on table 'deletion_requests' expected to update 1 row(s); 0 were matched.")

    response = TestClient(app).post("/race")
    assert response.status_code == 409
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["code"] == "conflict" and "deletion_requests" not in response.json()["detail"]
