"""The one transition function: allowed moves stamp their timestamp and append one audit event; others change nothing."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, select

from service.db import session_scope, utcnow
from service.deletion_requests.models import AuditEvent, DeletionRequest, RequestStatus as S
from service.deletion_requests.transitions import transition
from service.errors import Conflict, InvalidTransition
from service.registry.models import ModelVersion, RegisteredModel

# The lifecycle the spec describes, written out independently of transitions.ALLOWED.
ALLOWED_MOVES = [
    (S.RECEIVED, S.QUEUED), (S.RECEIVED, S.REJECTED), (S.RECEIVED, S.CANCELED),
    (S.QUEUED, S.RUNNING), (S.QUEUED, S.COMPLETED), (S.QUEUED, S.REJECTED), (S.QUEUED, S.CANCELED),
    (S.RUNNING, S.COMPLETED), (S.RUNNING, S.FAILED), (S.RUNNING, S.REJECTED), (S.RUNNING, S.CANCELED),
    (S.RUNNING, S.QUEUED),  # the lease was lost: run it again
    (S.FAILED, S.QUEUED),  # retry
    (S.COMPLETED, S.PROPAGATED),  # every consumer of the model serves the version that fulfilled it
]
STAMPED = {S.QUEUED: "queued_at", S.RUNNING: "started_at", S.COMPLETED: "finished_at", S.FAILED: "finished_at",
           S.REJECTED: "finished_at", S.CANCELED: "finished_at", S.PROPAGATED: "propagated_at"}
TIMESTAMP_FIELDS = ("queued_at", "started_at", "finished_at", "propagated_at", "updated_at")
FINISHED = (S.PROPAGATED, S.REJECTED, S.CANCELED)  # completed still moves on, to propagated


def ids(moves):
    return [f"{a}->{b}" for a, b in moves]


@pytest.fixture
def make_request(backend):
    """A deletion request row in ``status`` (rows written directly, with a held lease), returning its id."""
    with session_scope(backend.settings.database) as session:
        model = RegisteredModel(name="digits")
        session.add(model)
        session.flush()
        version = ModelVersion(model_id=model.id, version=1, sha256="0" * 64, size=1, card={"classes": ["0", "1"]},
                               classes_forgotten=[])
        session.add(version)
        session.flush()
        model.current_version_id = version.id
        model_id = model.id
    counter = iter(range(1000))

    def make(status: S) -> str:
        received = utcnow() - timedelta(days=1)
        with session_scope(backend.settings.database) as session:
            row = DeletionRequest(external_id=f"subject-{next(counter)}", model_id=model_id, forget_class="0",
                                  forget_uri="file:///data/0", status=status, received_at=received,
                                  due_at=received + timedelta(days=30), at_risk_from=received + timedelta(days=22.5),
                                  created_at=received, updated_at=received, body_sha256="0" * 64,
                                  lease_owner="worker-a", lease_expires_at=utcnow() + timedelta(minutes=2))
            session.add(row)
            session.flush()
            return row.id

    return make


def events_of(session, request_id: str) -> list[AuditEvent]:
    return session.scalars(select(AuditEvent).where(AuditEvent.request_id == request_id).order_by(AuditEvent.id)).all()


def snapshot(row: DeletionRequest) -> dict:
    return {name: getattr(row, name) for name in ("status", *TIMESTAMP_FIELDS, "lease_owner", "lease_expires_at")}


@pytest.mark.parametrize(("start", "to"), ALLOWED_MOVES, ids=ids(ALLOWED_MOVES))
def test_an_allowed_move_stamps_its_timestamp_and_appends_one_audit_event(backend, make_request, start, to):
    request_id = make_request(start)
    before = utcnow()
    with session_scope(backend.settings.database) as session:
        row = session.get(DeletionRequest, request_id)
        untouched = {f: getattr(row, f) for f in ("queued_at", "started_at", "finished_at") if f != STAMPED[to]}
        returned = transition(session=session, request=row, to=to, actor="worker:w1", detail={"why": "test"})
        assert returned is row
    after = utcnow()

    with session_scope(backend.settings.database) as session:
        row = session.get(DeletionRequest, request_id)
        assert row.status == to
        stamped = getattr(row, STAMPED[to])
        assert before <= stamped <= after
        assert row.updated_at == stamped
        assert {f: getattr(row, f) for f in untouched} == untouched
        events = events_of(session, request_id)
        assert len(events) == 1
        (event,) = events
        assert event.event == f"status:{to}"
        assert (event.from_status, event.to_status) == (start, to)
        assert event.actor == "worker:w1"
        assert event.detail == {"why": "test"}
        assert before <= event.at <= after


@pytest.mark.parametrize("to", [S.QUEUED, S.COMPLETED, S.FAILED, S.REJECTED, S.CANCELED])
def test_leaving_running_for_anything_but_running_releases_the_lease(backend, make_request, to):
    request_id = make_request(S.RUNNING)
    with session_scope(backend.settings.database) as session:
        transition(session=session, request=session.get(DeletionRequest, request_id), to=to, actor="worker:w1")
    with session_scope(backend.settings.database) as session:
        row = session.get(DeletionRequest, request_id)
        assert row.lease_owner is None and row.lease_expires_at is None


def test_starting_a_run_keeps_the_workers_lease(backend, make_request):
    request_id = make_request(S.QUEUED)
    with session_scope(backend.settings.database) as session:
        transition(session=session, request=session.get(DeletionRequest, request_id), to=S.RUNNING, actor="worker:w1")
    with session_scope(backend.settings.database) as session:
        assert session.get(DeletionRequest, request_id).lease_owner == "worker-a"


@pytest.mark.parametrize("start", list(S), ids=[s.value for s in S])
def test_every_disallowed_move_raises_invalid_transition_and_changes_nothing(backend, make_request, start):
    allowed = {to for a, to in ALLOWED_MOVES if a == start}
    disallowed = [to for to in S if to not in allowed]
    assert start in disallowed, "staying in the same status is never a transition"
    request_id = make_request(start)
    with session_scope(backend.settings.database) as session:
        row = session.get(DeletionRequest, request_id)
        before = snapshot(row)
        for to in disallowed:
            with pytest.raises(InvalidTransition) as raised:
                transition(session=session, request=row, to=to, actor="worker:w1")
            assert raised.value.extra == {"current_status": start}
            assert snapshot(row) == before, f"{start} -> {to} changed the row"
        session.flush()
        assert session.scalar(select(func.count()).select_from(AuditEvent)) == 0
    with session_scope(backend.settings.database) as session:
        assert snapshot(session.get(DeletionRequest, request_id)) == before
        assert events_of(session, request_id) == []


@pytest.mark.parametrize(("start", "to"), [(S.COMPLETED, S.QUEUED), (S.CANCELED, S.RUNNING), (S.REJECTED, S.QUEUED),
                                           (S.QUEUED, S.FAILED), (S.RECEIVED, S.RUNNING), (S.FAILED, S.COMPLETED)],
                         ids=ids([(S.COMPLETED, S.QUEUED), (S.CANCELED, S.RUNNING), (S.REJECTED, S.QUEUED),
                                  (S.QUEUED, S.FAILED), (S.RECEIVED, S.RUNNING), (S.FAILED, S.COMPLETED)]))
def test_a_disallowed_move_is_a_409_conflict(backend, make_request, start, to):
    request_id = make_request(start)
    with session_scope(backend.settings.database) as session:
        with pytest.raises(InvalidTransition) as raised:
            transition(session=session, request=session.get(DeletionRequest, request_id), to=to, actor="api-key:a")
    error = raised.value
    assert isinstance(error, Conflict)
    assert (error.status, error.code) == (409, "invalid_transition")
    assert start in error.detail and to in error.detail


@pytest.mark.parametrize("final", FINISHED, ids=[s.value for s in FINISHED])
def test_a_finished_request_never_moves_again(backend, make_request, final):
    request_id = make_request(final)
    with session_scope(backend.settings.database) as session:
        row = session.get(DeletionRequest, request_id)
        for to in S:
            with pytest.raises(InvalidTransition):
                transition(session=session, request=row, to=to, actor="worker:w1")
        assert row.status == final


def test_the_whole_lifecycle_leaves_a_chained_audit_trail(backend, make_request):
    request_id = make_request(S.RECEIVED)
    path = [S.QUEUED, S.RUNNING, S.FAILED, S.QUEUED, S.RUNNING, S.COMPLETED]
    with session_scope(backend.settings.database) as session:
        row = session.get(DeletionRequest, request_id)
        for to in path:
            transition(session=session, request=row, to=to, actor="worker:w1")
    with session_scope(backend.settings.database) as session:
        events = events_of(session, request_id)
        assert [(e.from_status, e.to_status) for e in events] == list(zip([S.RECEIVED, *path], path))
        assert [e.event for e in events] == [f"status:{to}" for to in path]
        assert all(a.at <= b.at for a, b in zip(events, events[1:]))
        row = session.get(DeletionRequest, request_id)
        assert row.status == S.COMPLETED
        assert row.queued_at <= row.started_at <= row.finished_at


def test_a_transition_rolled_back_with_its_transaction_leaves_no_trace(backend, make_request):
    request_id = make_request(S.QUEUED)
    with pytest.raises(RuntimeError):
        with session_scope(backend.settings.database) as session:
            transition(session=session, request=session.get(DeletionRequest, request_id), to=S.RUNNING,
                       actor="worker:w1")
            raise RuntimeError("the worker crashed before commit")
    with session_scope(backend.settings.database) as session:
        assert session.get(DeletionRequest, request_id).status == S.QUEUED
        assert events_of(session, request_id) == []


def test_api_created_requests_go_through_the_same_transition(client, admin, backend, digits, digits_model):
    from tests.service.conftest import register_digits, request_body

    assert register_digits(client, admin, digits_model).status_code == 201
    request_id = client.post("/deletion-requests", headers=admin, json=request_body(digits)).json()["id"]
    with session_scope(backend.settings.database) as session:
        row = session.get(DeletionRequest, request_id)
        transition(session=session, request=row, to=S.RUNNING, actor="worker:w1")
        with pytest.raises(InvalidTransition):
            transition(session=session, request=row, to=S.RECEIVED, actor="worker:w1")
    body = client.get(f"/deletion-requests/{request_id}", headers=admin).json()
    assert body["status"] == "running" and body["started_at"] is not None
    assert [(e["event"], e["actor"]) for e in body["events"]][-1] == ("status:running", "worker:w1")
