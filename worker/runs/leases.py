"""Leases: a worker claims a model and a batch of its queued requests, keeps the lease alive from a
heartbeat, and writes a batch's outcome only while the lease (its fencing token) still holds."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from sqlalchemy import or_, select, update

from service.config import Settings
from service.db import db_now, session_scope
from service.deletion_requests.models import DeletionRequest, RequestStatus as S
from service.deletion_requests.transitions import record, transition
from service.registry.models import ModelVersion, RegisteredModel
from worker.runs.batch import Batch, run_fields

log = logging.getLogger("lethe.worker")


def claim_batch(settings: Settings, model_id: str, worker_id: str) -> Batch | None:
    """Lease the model and mark all its queued requests running; None when another worker holds it."""
    with session_scope(settings.database) as session:
        now = db_now(session)
        expires = now + timedelta(seconds=settings.lease_seconds)
        leased = session.execute(
            update(RegisteredModel)
            .where(RegisteredModel.id == model_id,
                   or_(RegisteredModel.run_lease_owner.is_(None), RegisteredModel.run_lease_expires_at < now))
            .values(run_lease_owner=worker_id, run_lease_expires_at=expires,
                    run_lease_token=RegisteredModel.run_lease_token + 1)
        ).rowcount
        if not leased:
            return None
        model = session.get(RegisteredModel, model_id)
        session.refresh(model)
        # Locked rows are skipped, not waited for: a request a caller is canceling right now is
        # either canceled before this claim sees it or claimed before the cancel reads it (then the
        # cancel finds it running and asks the run to stop). Never both.
        queued = session.scalars(select(DeletionRequest).where(
            DeletionRequest.model_id == model_id, DeletionRequest.status == S.QUEUED)
            .order_by(DeletionRequest.created_at).limit(settings.max_batch_requests)
            .with_for_update(skip_locked=True)).all()
        if not queued:
            model.run_lease_owner = model.run_lease_expires_at = None
            return None
        # Oldest first; a request whose earlier batch failed runs alone when its turn comes.
        queued = queued[:1] if queued[0].run_alone else [r for r in queued if not r.run_alone]
        version = session.get(ModelVersion, model.current_version_id)
        for request in queued:
            transition(session=session, request=request, to=S.RUNNING, actor=f"worker:{worker_id}",
                       detail={"version": version.version, "batch": len(queued)})
            request.attempts += 1
            request.lease_owner, request.lease_expires_at = worker_id, expires
        return Batch(model_id=model_id, model_name=model.name, lease_token=model.run_lease_token,
                     version_id=version.id, version=version.version,
                     eval_set_uri=model.eval_set_uri, anchor_set_uri=model.anchor_set_uri, forgotten_earlier=list(version.classes_forgotten),
                     requests={r.id: (r.forget_class, r.forget_uri, r.seed) for r in queued})


def renew_leases(settings: Settings, batch: Batch, worker_id: str) -> bool:
    """Heartbeat: extend the model's and the requests' leases; False when the lease was lost."""
    with session_scope(settings.database) as session:
        expires = db_now(session) + timedelta(seconds=settings.lease_seconds)
        held = session.execute(update(RegisteredModel).where(
            RegisteredModel.id == batch.model_id, RegisteredModel.run_lease_owner == worker_id,
            RegisteredModel.run_lease_token == batch.lease_token)
            .values(run_lease_expires_at=expires)).rowcount
        session.execute(update(DeletionRequest).where(
            DeletionRequest.id.in_(list(batch.requests)), DeletionRequest.lease_owner == worker_id)
            .values(lease_expires_at=expires))
        return bool(held)


def release_model(session, batch: Batch, worker_id: str) -> None:
    session.execute(update(RegisteredModel).where(
        RegisteredModel.id == batch.model_id, RegisteredModel.run_lease_owner == worker_id,
        RegisteredModel.run_lease_token == batch.lease_token)
        .values(run_lease_owner=None, run_lease_expires_at=None))


@contextmanager
def settling(settings: Settings, batch: Batch, worker_id: str, *, publishing: bool = False, release: bool = True
             ) -> Iterator[tuple[Any, dict[str, DeletionRequest]] | None]:
    """The one transaction in which a worker writes about its batch, and only while its lease holds:
    the model row is locked and must still carry this worker and the batch's fencing token (and, to
    publish, the version the batch started from). Yields (session, the requests this worker still
    runs), or None when it was fenced out: then it writes nothing and logs why. Releases the lease
    (the outcome), unless ``release`` is False (an event during the run)."""
    with session_scope(settings.database) as session:
        model = session.scalar(select(RegisteredModel).where(RegisteredModel.id == batch.model_id).with_for_update())
        if model.run_lease_owner != worker_id or model.run_lease_token != batch.lease_token:
            log.warning("model %s: the model's lease passed to another claim during the run; its outcome is "
                        "discarded and its requests left to whoever holds them", batch.model_name,
                        extra=run_fields(batch, worker_id))
            yield None
            return
        if publishing and model.current_version_id != batch.version_id:
            # Still this worker's lease, but its candidate forgot on a version that is no longer current:
            # its requests run again, on the new one.
            log.warning("model %s: another version was published during the run; its requests run again",
                        batch.model_name, extra=run_fields(batch, worker_id))
            for row in held_rows(session, batch, worker_id).values():
                back_to_queue(session, row, f"worker:{worker_id}", "another version was published during its run")
            release_model(session, batch, worker_id)
            yield None
            return
        yield session, held_rows(session, batch, worker_id)
        if release:
            release_model(session, batch, worker_id)


def back_to_queue(session, row: DeletionRequest, actor: str, why: str, *, alone: bool = False) -> None:
    """A request its run could not settle goes back to the queue (to run alone, when ``alone``), or
    ends canceled if its cancel arrived meanwhile: a cancel acknowledged is never run again."""
    if row.cancel_requested:
        transition(session=session, request=row, to=S.CANCELED, actor=actor, detail={"reason": "canceled during the run"})
        return
    transition(session=session, request=row, to=S.QUEUED, actor=actor,
               detail={"reason": why + ("; it runs alone next" if alone else "")})
    row.run_alone = row.run_alone or alone


def held_rows(session, batch: Batch, worker_id: str) -> dict[str, DeletionRequest]:
    """The batch's requests this worker still runs, locked until the transaction ends. A request
    the sweep re-queued (lease expired) or that another worker now runs is not among them: this
    worker leaves it alone."""
    rows = session.scalars(select(DeletionRequest).where(
        DeletionRequest.id.in_(list(batch.requests)), DeletionRequest.status == S.RUNNING,
        DeletionRequest.lease_owner == worker_id).with_for_update()).all()
    lost = set(batch.requests) - {r.id for r in rows}
    if lost:
        log.warning("model %s: %d request(s) of the batch are no longer this worker's; left as they are",
                    batch.model_name, len(lost), extra={"model": batch.model_name, "deletion_requests": sorted(lost)})
    return {r.id: r for r in rows}


class Heartbeat(threading.Thread):
    """While the engine runs: renews the leases every third of their length, and answers the
    engine's per-step "should I stop?" from the database at most once a second."""

    def __init__(self, settings: Settings, batch: Batch, worker_id: str) -> None:
        super().__init__(daemon=True, name="lethe-heartbeat")
        self.settings, self.batch, self.worker_id = settings, batch, worker_id
        self.stopped = threading.Event()
        self.lost = False
        self.last_renewed = time.monotonic()
        self.last_cancel_check, self.canceled = 0.0, False
        self.started, self.timed_out = time.monotonic(), False
        self.training_recorded = False

    def run(self) -> None:
        while not self.stopped.wait(self.settings.lease_seconds / 3):
            try:
                self.lost = not renew_leases(self.settings, self.batch, self.worker_id)
                self.last_renewed = time.monotonic()
            except Exception:  # a database hiccup: try again next beat; the lease has some slack
                log.exception("heartbeat failed")
                # Give up before the lease could have expired: past two thirds of it, another worker
                # may be about to claim the model, and this run must stop rather than race it.
                if time.monotonic() - self.last_renewed >= self.settings.lease_seconds * 2 / 3:
                    self.lost = True

    def stop(self) -> None:
        self.stopped.set()
        self.join()

    def should_cancel(self) -> bool:
        """Stop the run? A cancel, a lost lease, or LETHE_RUN_TIMEOUT passed."""
        now = time.monotonic()
        if not self.canceled and now - self.last_cancel_check >= 1.0:
            self.last_cancel_check = now
            self.canceled = cancel_requested(self.settings, self.batch)
        self.timed_out = self.timed_out or now - self.started > self.settings.run_timeout
        return self.lost or self.canceled or self.timed_out

    def check(self) -> None:
        """Between the run's phases: UnlearningCancelled when the run must stop."""
        from worker.engine import UnlearningCancelled

        if self.should_cancel():
            raise UnlearningCancelled("stopped between phases")

    def on_progress(self, progress) -> None:
        if not self.training_recorded:  # one audit event, not one per step (nor per fold of the holdout check)
            self.training_recorded = True
            # Only on the requests this run still holds: a fenced-out worker writes nothing into the
            # trail of a request another worker now runs.
            with settling(self.settings, self.batch, self.worker_id, release=False) as held:
                for row in (held[1].values() if held else ()):
                    # The step's highest forget-set accuracy, not a figure per class (a class is often a person).
                    record(session=held[0], request=row, event="training_started", actor=f"worker:{self.worker_id}",
                           detail={"loss": progress.loss, "forget_acc_max": max(progress.forget_acc.values(), default=None)})


def cancel_requested(settings: Settings, batch: Batch) -> bool:
    with session_scope(settings.database) as session:
        return bool(session.scalar(select(DeletionRequest.id).where(
            DeletionRequest.id.in_(list(batch.requests)), DeletionRequest.cancel_requested.is_(True)).limit(1)))
