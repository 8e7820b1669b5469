"""The periodic sweep, called directly: dead workers' requests come back, deadlines are flagged
once, superseded weights are disposed of after the retention period, weights no version names
after a grace period."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import select

from service.db import db_now, session_factory, session_scope, utcnow
from service.deletion_requests import run_durations
from service.deletion_requests.models import DeletionRequest
from service.deletion_requests.transitions import transition
from service.registry.models import ModelVersion, RegisteredModel
from service.registry.service import publish_version
from tests.service_fixtures import register_digits, request_body
from worker.runs.sweep import flag_deadlines, redact_in_batches, sweep


def submit(client, admin, digits, **changes) -> str:
    return client.post("/deletion-requests", headers=admin, json={**request_body(digits), **changes}).json()["id"]


def abandon(backend, request_id: str) -> None:
    """The request as a worker that died mid-run left it: running, its lease and the model's expired."""
    with session_scope(backend.settings.database) as session:
        row = session.get(DeletionRequest, request_id)
        transition(session=session, request=row, to="running", actor="worker:dead")
        row.lease_owner, row.lease_expires_at = "worker:dead", utcnow() - timedelta(seconds=1)
        model = session.get(RegisteredModel, row.model_id)
        model.run_lease_owner, model.run_lease_expires_at = "worker:dead", utcnow() - timedelta(seconds=1)


def test_a_request_whose_worker_lease_expired_is_queued_again_and_woken(backend, client, admin, digits, digits_model):
    register_digits(client, admin, digits_model)
    request_id = submit(client, admin, digits)
    abandon(backend, request_id)
    woken: list[str] = []
    counts = sweep(backend.settings, woken.append)
    assert counts["requeued"] == 1 and woken == [request_id]
    body = client.get(f"/deletion-requests/{request_id}", headers=admin).json()
    assert body["status"] == "queued"
    assert "lease of worker:dead expired" in body["events"][-1]["detail"]["reason"]
    with session_scope(backend.settings.database) as session:
        assert session.scalar(select(RegisteredModel.run_lease_owner)) is None


def test_a_queued_request_is_woken_even_when_its_message_was_lost(backend, client, admin, digits, digits_model):
    register_digits(client, admin, digits_model)
    first, second = submit(client, admin, digits), submit(client, admin, digits, external_id="s2", forget_class="4")
    woken: list[str] = []
    sweep(backend.settings, woken.append)
    assert woken == [first]  # one wake-up per model: each run of the model wakes its next one
    assert second not in woken


def test_deadlines_are_flagged_once_each(backend, client, admin, digits, digits_model):
    register_digits(client, admin, digits_model)
    now = utcnow()
    at_risk = submit(client, admin, digits, received_at=(now - timedelta(days=25)).isoformat())
    overdue = submit(client, admin, digits, external_id="late", forget_class="4",
                     received_at=(now - timedelta(days=31)).isoformat())
    fresh = submit(client, admin, digits, external_id="fresh", forget_class="5")
    first = sweep(backend.settings, lambda _: None)
    again = sweep(backend.settings, lambda _: None)
    assert (first["at_risk"], first["overdue"]) == (1, 1) and (again["at_risk"], again["overdue"]) == (0, 0)
    events = {i: [e["event"] for e in client.get(f"/deletion-requests/{i}", headers=admin).json()["events"]]
              for i in (at_risk, overdue, fresh)}
    assert "at_risk" in events[at_risk] and "overdue" in events[overdue]
    assert not {"at_risk", "overdue"} & set(events[fresh])


def test_an_at_risk_request_that_becomes_overdue_is_flagged_overdue_once(backend, client, admin, digits, digits_model):
    register_digits(client, admin, digits_model)
    request_id = submit(client, admin, digits, received_at=(utcnow() - timedelta(days=25)).isoformat())
    assert sweep(backend.settings, lambda _: None)["at_risk"] == 1
    with session_scope(backend.settings.database) as session:  # five days later
        row = session.get(DeletionRequest, request_id)
        row.due_at, row.at_risk_from = utcnow() - timedelta(hours=1), utcnow() - timedelta(days=8)
    counts = [sweep(backend.settings, lambda _: None) for _ in range(2)]
    assert [(c["at_risk"], c["overdue"]) for c in counts] == [(0, 1), (0, 0)]
    events = [e["event"] for e in client.get(f"/deletion-requests/{request_id}", headers=admin).json()["events"]]
    assert (events.count("at_risk"), events.count("overdue")) == (1, 1)


def test_a_redaction_backlog_is_worked_off_in_batches_over_sweeps(backend, client, admin, digits, digits_model):
    register_digits(client, admin, digits_model)
    ids = [submit(client, admin, digits, external_id=f"s{k}", forget_class=str(k)) for k in range(5)]
    for request_id in ids:
        assert client.post(f"/deletion-requests/{request_id}/cancel", headers=admin).status_code == 200
    settings, now = backend.settings, utcnow() + timedelta(days=1)
    assert redact_in_batches(settings, now, after_days=0, batch=2, budget_seconds=0) == 2  # one batch, then stop
    assert redact_in_batches(settings, now, after_days=0, batch=2) == 3  # the rest, in two more
    assert redact_in_batches(settings, now, after_days=0, batch=2) == 0
    with session_scope(settings.database) as session:
        assert {r.forget_class for r in session.scalars(select(DeletionRequest))} == {"redacted"}


def test_superseded_weights_are_deleted_after_the_retention_period_and_answer_410(
        backend, client, admin, digits, digits_model):
    register_digits(client, admin, digits_model)
    store = client.app.state.store
    with session_scope(backend.settings.database) as session:
        model = session.scalar(select(RegisteredModel))
        first = session.scalar(select(ModelVersion))
        incoming = store.new_incoming()
        incoming.write_bytes(b"not really weights, but another file")
        sha256, size = store.put(incoming)
        publish_version(session=session, model_id=model.id, sha256=sha256, size=size, card=first.card,
                        classes_forgotten=["3"], metrics={})
        first_sha = first.sha256
    kept = sweep(backend.settings, lambda _: None)
    assert kept["disposed"] == 0 and store.exists(first_sha)  # within the 72 h retention

    settings = backend.settings.model_copy(update={"retention_hours": 0})
    assert sweep(settings, lambda _: None)["disposed"] == 1
    assert not store.exists(first_sha) and store.exists(sha256)
    response = client.get("/models/digits/versions/1/weights", headers=admin)
    assert response.status_code == 410 and response.json()["code"] == "gone"
    listed = client.get("/models/digits/versions", headers=admin).json()["versions"]
    assert listed[0]["sha256"] == first_sha and listed[0]["download_url"] is None and listed[0]["disposed_at"]


def test_weights_no_version_names_are_deleted_after_the_grace_period(backend, client, admin, digits, digits_model):
    """A registration or run that crashed between storing weights and committing the row naming them."""
    register_digits(client, admin, digits_model)
    store = client.app.state.store
    with session_scope(backend.settings.database) as session:
        named = session.scalar(select(ModelVersion.sha256))
    incoming = store.new_incoming()
    incoming.write_bytes(b"a crashed registration's copy of the base model")
    orphan = store.put(incoming)[0]
    kept = sweep(backend.settings, lambda _: None)
    assert kept["orphans"] == 0 and store.exists(orphan)  # within the grace period: its commit may be coming

    later = backend.settings.model_copy(update={"orphan_grace_hours": 1e-9})
    assert sweep(later, lambda _: None)["orphans"] == 1
    assert not store.exists(orphan) and store.exists(named)
    assert client.get("/models/digits/versions/1/weights", headers=admin).status_code == 200


def dead_worker_holds(backend, request_ids: list[str], attempts: int = 1) -> None:
    """The requests run under a worker that died: status running, its lease expired."""
    with session_scope(backend.settings.database) as session:
        for request_id in request_ids:
            row = session.get(DeletionRequest, request_id)
            transition(session=session, request=row, to="running", actor="worker:dead")
            row.lease_owner, row.lease_expires_at = "worker:dead", utcnow() - timedelta(seconds=1)
            row.attempts = attempts


def test_a_dead_workers_batch_runs_again_each_request_alone(backend, client, admin, digits, digits_model):
    register_digits(client, admin, digits_model)
    ids = [submit(client, admin, digits), submit(client, admin, digits, external_id="s2", forget_class="4")]
    dead_worker_holds(backend, ids)
    assert sweep(backend.settings, lambda _: None)["requeued"] == 2
    with session_scope(backend.settings.database) as session:
        rows = [session.get(DeletionRequest, i) for i in ids]
        assert [(r.status, r.run_alone) for r in rows] == [("queued", True), ("queued", True)]


def test_a_request_whose_runs_keep_dying_fails_instead_of_blocking_its_model(backend, client, admin, digits,
                                                                            digits_model):
    register_digits(client, admin, digits_model)
    request_id = submit(client, admin, digits)
    dead_worker_holds(backend, [request_id], attempts=backend.settings.max_attempts)
    counts = sweep(backend.settings, lambda _: None)
    assert (counts["failed"], counts["requeued"]) == (1, 0)
    body = client.get(f"/deletion-requests/{request_id}", headers=admin).json()
    assert body["status"] == "failed" and "ended 5 times without an outcome" in body["error"]


# --- sweeps beside other transactions (Postgres: row locks; SQLite takes turns at BEGIN IMMEDIATE) -----

def only_on_postgres(backend) -> None:
    if backend.name != "postgres":
        pytest.skip("SQLite serialises writers from their first statement (BEGIN IMMEDIATE): no interleaving")


def sweep_within(settings, seconds: float = 30) -> dict:
    """A sweep in a thread of its own, which must end within ``seconds`` (it waits for no one)."""
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(sweep(settings, lambda _: None)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "the sweep waited for another transaction's locks"
    return result


def test_overlapping_sweeps_write_each_deadline_flag_once(backend, client, admin, digits, digits_model):
    only_on_postgres(backend)
    register_digits(client, admin, digits_model)
    late = submit(client, admin, digits, received_at=(utcnow() - timedelta(days=31)).isoformat())
    first = session_factory(backend.settings.database)()
    try:
        counts = {"overdue": 0, "at_risk": 0}
        flag_deadlines(first, db_now(first), counts)  # a sweep in flight: flagged, not committed yet
        assert counts["overdue"] == 1
        assert sweep_within(backend.settings)["overdue"] == 0  # the one it holds is skipped, not waited for
        first.commit()
    finally:
        first.close()
    assert sweep(backend.settings, lambda _: None)["overdue"] == 0
    events = [e["event"] for e in client.get(f"/deletion-requests/{late}", headers=admin).json()["events"]]
    assert events.count("overdue") == 1


def test_a_sweep_failing_a_dead_run_and_a_worker_settling_its_own_both_commit(backend, client, admin, digits,
                                                                            digits_model):
    """Both runs end (the counters of the run-duration histogram), and the sweep would flag the
    settling worker's request: found by an outside test as a deadlock, one of the two rolled back."""
    only_on_postgres(backend)
    register_digits(client, admin, digits_model)
    dead = submit(client, admin, digits, external_id="dead", forget_class="4")
    dead_worker_holds(backend, [dead], attempts=backend.settings.max_attempts)
    live = submit(client, admin, digits, received_at=(utcnow() - timedelta(days=25)).isoformat())  # at risk
    worker = session_factory(backend.settings.database)()
    try:
        row = worker.get(DeletionRequest, live, with_for_update=True)  # the worker settling its run
        transition(session=worker, request=row, to="running", actor="worker:live")
        transition(session=worker, request=row, to="completed", actor="worker:live")
        counts = sweep_within(backend.settings)
        worker.commit()
    finally:
        worker.close()
    assert (counts["failed"], counts["at_risk"]) == (1, 0)  # the worker's request waits for the next sweep
    with session_scope(backend.settings.database) as session:
        assert session.get(DeletionRequest, live).status == "completed"
        assert run_durations.read(session).count == 2
    assert sweep(backend.settings, lambda _: None)["at_risk"] == 1
