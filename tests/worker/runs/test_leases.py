"""A worker settles only what it still holds: once its lease is gone (expired and taken over, or a
version published meanwhile), its outcome is discarded and its stored candidate deleted.

Every test runs on the embedded default and on Postgres; the worker's steps are called in this
process, in the order a stalled worker and its replacement would take them.
"""

from __future__ import annotations

import shutil
import time
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from service.db import session_scope, utcnow
from service.deletion_requests.models import AuditEvent, DeletionRequest, RequestStatus as S
from service.registry.models import ModelVersion, RegisteredModel
from service.registry.storage import artifact_store, sha256_of
from tests.service_fixtures import free_port, register_digits, request_body, wait_for
from worker.engine.loop import Progress
from worker.runs.gate import GateVerdict
from worker.runs.leases import Heartbeat, claim_batch
from worker.runs.settle import finish, settle_failure
from worker.runs.sweep import sweep
from worker.runs.train import BatchResult


def a_queued_request(backend, client, admin, digits, digits_model) -> tuple[str, str]:
    """(model id, request id) of one request queued on a newly registered digits model."""
    assert register_digits(client, admin, digits_model).status_code == 201
    request_id = client.post("/deletion-requests", headers=admin, json=request_body(digits)).json()["id"]
    with session_scope(backend.settings.database) as session:
        return session.scalar(select(RegisteredModel.id)), request_id


@pytest.fixture
def taken_over(backend, client, admin, digits, digits_model):
    """A request claimed by worker w1, whose lease then expired; the sweep re-queued it and w2 claimed it."""
    model_id, request_id = a_queued_request(backend, client, admin, digits, digits_model)
    stalled = claim_batch(backend.settings, model_id, "w1")
    assert stalled is not None and request_id in stalled.requests
    assert expire_and_claim(backend, model_id, "w2") is not None
    return stalled, request_id


def expire_and_claim(backend, model_id: str, worker: str):
    """Every lease expires, the sweep re-queues what they held, and ``worker`` claims the model."""
    past = utcnow() - timedelta(seconds=1)
    with session_scope(backend.settings.database) as session:
        session.execute(update(RegisteredModel).values(run_lease_expires_at=past))
        session.execute(update(DeletionRequest).values(lease_expires_at=past))
    assert sweep(backend.settings, lambda _id: None)["requeued"] == 1
    return claim_batch(backend.settings, model_id, worker)


def held_by(backend, request_id: str) -> tuple[str, str | None]:
    with session_scope(backend.settings.database) as session:
        row = session.get(DeletionRequest, request_id)
        return row.status, row.lease_owner


def candidate_of(package, folder):
    """A candidate package whose weights differ from the parent's (another sha256)."""
    shutil.copytree(package, folder)
    with open(folder / "model.safetensors", "ab") as weights:
        weights.write(b" ")  # another sha256; a fenced-out candidate is never loaded
    return folder


def test_a_worker_whose_lease_was_taken_over_publishes_nothing_and_keeps_no_weights(backend, taken_over, digits_model,
                                                                                    tmp_path):
    stalled, request_id = taken_over
    candidate = candidate_of(digits_model, tmp_path / "candidate")
    sha256, _size = sha256_of(candidate / "model.safetensors")
    report = {"classes": ["3"], "target_met": True, "forget_acc_after": {"3": 0.0}}
    finish(backend.settings, stalled, "w1", rejected={}, runnable=stalled.requests,
           result=BatchResult(report, {}, candidate, GateVerdict(), {}))
    with session_scope(backend.settings.database) as session:
        assert [v.version for v in session.scalars(select(ModelVersion))] == [1]
    assert held_by(backend, request_id) == (S.RUNNING, "w2")
    # Its stored candidate is the orphan sweep's (the worker that took over may store the same bytes).
    later = backend.settings.model_copy(update={"orphan_grace_hours": 1e-9})
    assert sweep(later, lambda _id: None)["orphans"] == 1
    assert not artifact_store(backend.settings).exists(sha256)


def test_a_worker_whose_lease_was_taken_over_does_not_fail_the_requests_another_worker_runs(backend, taken_over):
    stalled, request_id = taken_over
    settle_failure(backend.settings, stalled, "w1", error="RuntimeError: stalled worker")
    assert held_by(backend, request_id) == (S.RUNNING, "w2")


def test_a_batch_claimed_before_a_newer_claim_by_the_same_worker_settles_nothing(backend, client, admin, digits,
                                                                                  digits_model):
    """The fencing token: a worker id alone cannot tell an old claim from a new one."""
    model_id, request_id = a_queued_request(backend, client, admin, digits, digits_model)
    old = claim_batch(backend.settings, model_id, "w1")
    new = expire_and_claim(backend, model_id, "w1")
    assert new.lease_token > old.lease_token
    settle_failure(backend.settings, old, "w1", error="RuntimeError: the old claim's run")
    assert held_by(backend, request_id) == (S.RUNNING, "w1")
    settle_failure(backend.settings, new, "w1", error="RuntimeError: the new claim's run")
    assert held_by(backend, request_id) == (S.FAILED, None)


def test_a_heartbeat_that_keeps_failing_gives_the_lease_up_before_it_could_expire(backend, taken_over):
    stalled, _request_id = taken_over
    # The database becomes unreachable for this worker: every renewal fails (connection refused).
    unreachable = backend.settings.model_copy(update={
        "database_url": f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/gone", "lease_seconds": 3})
    heartbeat = Heartbeat(unreachable, stalled, "w1")
    started = time.monotonic()
    heartbeat.start()
    try:
        wait_for(lambda: heartbeat.lost, timeout=unreachable.lease_seconds, interval=0.05,
                 message="the heartbeat to give the lease up")
    finally:
        heartbeat.stop()
    assert time.monotonic() - started < unreachable.lease_seconds


def training_events(backend, request_id: str) -> list[str]:
    with session_scope(backend.settings.database) as session:
        return list(session.scalars(select(AuditEvent.actor).where(
            AuditEvent.request_id == request_id, AuditEvent.event == "training_started")))


STEP = Progress(step=1, max_steps=100, loss=0.5, forget_acc={"3": 50.0}, confirmed=False)


def test_a_worker_records_its_training_only_on_requests_it_still_holds(backend, client, admin, digits, digits_model):
    model_id, request_id = a_queued_request(backend, client, admin, digits, digits_model)
    stalled = claim_batch(backend.settings, model_id, "w1")
    Heartbeat(backend.settings, stalled, "w1").on_progress(STEP)
    assert training_events(backend, request_id) == ["worker:w1"]
    taken = expire_and_claim(backend, model_id, "w2")
    Heartbeat(backend.settings, stalled, "w1").on_progress(STEP)  # the stalled run reaches its first step again
    Heartbeat(backend.settings, taken, "w2").on_progress(STEP)
    assert training_events(backend, request_id) == ["worker:w1", "worker:w2"]
    assert held_by(backend, request_id) == (S.RUNNING, "w2")  # and its lease is left alone


def test_a_cancel_that_arrives_after_the_last_step_wins_over_the_result(backend, client, admin, digits, digits_model,
                                                                        tmp_path):
    """The caller was told the run will stop: a result ready a moment too late is not published."""
    model_id, request_id = a_queued_request(backend, client, admin, digits, digits_model)
    batch = claim_batch(backend.settings, model_id, "w1")
    assert client.post(f"/deletion-requests/{request_id}/cancel", headers=admin).json()["events"][-1]["event"] == "cancel_requested"
    report = {"classes": ["3"], "target_met": True, "forget_acc_after": {"3": 0.0}}
    finish(backend.settings, batch, "w1", rejected={}, runnable=batch.requests,
           result=BatchResult(report, {}, candidate_of(digits_model, tmp_path / "candidate"), GateVerdict(), {}))
    with session_scope(backend.settings.database) as session:
        assert [v.version for v in session.scalars(select(ModelVersion))] == [1]
        row = session.get(DeletionRequest, request_id)
        assert (row.status, row.fulfilled_version_id, row.lease_owner) == (S.CANCELED, None, None)
        assert session.get(RegisteredModel, model_id).run_lease_owner is None
