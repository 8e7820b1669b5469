"""The periodic sweep: re-queue requests whose worker died, wake idle queues, flag deadlines,
redact finished requests' personal data, dispose of superseded weights and of weights no version names."""

from __future__ import annotations

import logging
import time
from collections import Counter

from sqlalchemy import exists, select, update

from service.config import Settings
from service.db import db_now, session_scope
from service.consumers.propagation import propagate
from service.deletion_requests.models import AuditEvent, DeletionRequest, RequestStatus as S
from service.deletion_requests.service import RequestFilter, filtered
from service.deletion_requests.transitions import record, transition
from service.redaction import purge_old_pages, redact_due
from service.registry.models import RegisteredModel
from service.registry.service import dispose_superseded, remove_orphans
from service.registry.storage import artifact_store

log = logging.getLogger("lethe.worker")
REDACTION_BATCH = 500  # requests a transaction: ~2 s of row locks on a 2-core machine
REDACTION_SECONDS = 20.0  # a sweep's share of a redaction backlog; the next sweep goes on with it


def sweep(settings: Settings, enqueue) -> dict[str, int]:
    """Re-queue requests whose worker died, wake idle queues, flag deadlines, dispose of old weights
    and of weights no version names."""
    counts = {"requeued": 0, "failed": 0, "woken": 0, "at_risk": 0, "overdue": 0, "disposed": 0, "orphans": 0,
              "stale_parts": 0, "redacted": 0,
              "propagated": 0}
    wake: set[str] = set()
    with session_scope(settings.database) as session:
        now = db_now(session)  # leases are judged by the database's clock, as they were granted
        # The model rows first, as a worker's heartbeat and settling lock them: one lock order, no deadlock.
        session.execute(update(RegisteredModel).where(RegisteredModel.run_lease_expires_at < now)
                        .values(run_lease_owner=None, run_lease_expires_at=None))
        expired = session.scalars(select(DeletionRequest).where(
            DeletionRequest.status == S.RUNNING, DeletionRequest.lease_expires_at < now)
            .with_for_update(skip_locked=True)).all()  # a worker settling it now goes first
        batch_sizes = Counter(row.lease_owner for row in expired)
        for row in expired:
            recover(session, row, batch_sizes[row.lease_owner], settings, counts, wake)
        # One wake-up per model with waiting work, in case its message was lost.
        oldest_per_model: dict[str, str] = {}
        for model_id, request_id in session.execute(select(DeletionRequest.model_id, DeletionRequest.id).where(
                DeletionRequest.status == S.QUEUED).order_by(DeletionRequest.created_at)):
            oldest_per_model.setdefault(model_id, request_id)
        wake |= set(oldest_per_model.values())
        counts["woken"] = len(wake)
        flag_deadlines(session, now, counts)
    if settings.redact_after_days is not None:
        counts["redacted"] = redact_in_batches(settings, now, settings.redact_after_days)
    if counts["redacted"]:
        purge_old_pages(settings.database)
    counts["propagated"] = propagate_pending(settings)
    # Storage in transactions of its own: listing a store must not hold the locks above.
    store = artifact_store(settings)
    with session_scope(settings.database) as session:
        counts["disposed"] = len(dispose_superseded(session=session, store=store,
                                                    retention_hours=settings.retention_hours))
    counts["orphans"], counts["stale_parts"] = remove_orphans(settings=settings, store=store,
                                                              grace_hours=settings.orphan_grace_hours)
    for request_id in wake:
        enqueue(request_id)
    return counts


def redact_in_batches(settings: Settings, now, after_days: float, batch: int = REDACTION_BATCH,
                      budget_seconds: float = REDACTION_SECONDS) -> int:
    """Redact what is due, ``batch`` requests a transaction, for at most about ``budget_seconds``.

    A backlog (redaction switched on, or shortened, over a year of requests) is worked off over
    several sweeps in short transactions; as one transaction it held 150,000 rows locked for minutes
    and kept the sweep's other work waiting behind it (benchmarks/scale.py)."""
    redacted, started = 0, time.monotonic()
    while True:
        with session_scope(settings.database) as session:
            done = redact_due(session, now, after_days, limit=batch)
        redacted += done
        if done < batch or time.monotonic() - started >= budget_seconds:
            return redacted


def recover(session, row: DeletionRequest, batch_size: int, settings: Settings, counts: dict[str, int],
            wake: set[str]) -> None:
    """A request whose worker died mid-run. Its batch runs again, each request alone when the batch
    held several (one of them may be what kills the worker); after ``LETHE_MAX_ATTEMPTS`` runs that
    never came back, it fails, so a request that kills every worker cannot block its model's queue."""
    if row.attempts >= settings.max_attempts:
        error = (f"its run ended {row.attempts} times without an outcome (the worker died or lost its lease); "
                 "retry it once the cause is fixed")
        transition(session=session, request=row, to=S.FAILED, actor="sweep", detail={"error": error})
        row.error = error
        counts["failed"] += 1
        return
    transition(session=session, request=row, to=S.QUEUED, actor="sweep",
               detail={"reason": f"lease of {row.lease_owner} expired" + ("; it runs alone next" if batch_size > 1 else "")})
    row.run_alone = row.run_alone or batch_size > 1
    counts["requeued"] += 1
    wake.add(row.id)


def propagate_pending(settings: Settings) -> int:
    """Completed requests that no acknowledgement or completion moved on (completed before their
    model's consumers were counted, or a crash between commit and check): one transaction per model,
    the model's row locked first as everywhere."""
    with session_scope(settings.database) as session:
        models = session.scalars(select(DeletionRequest.model_id).distinct()
                                 .where(DeletionRequest.status == S.COMPLETED)).all()
    moved = 0
    for model_id in models:
        with session_scope(settings.database) as session:
            moved += len(propagate(session=session, model_id=model_id, actor="sweep"))
    return moved


def flag_deadlines(session, now, counts: dict[str, int]) -> None:
    """Once per request: an audit event when it becomes at risk and when it becomes overdue.

    Only the requests still missing their flag are read (NOT EXISTS over the trail's partial index
    of flags), so a pass costs what it writes: reading every request at risk with its whole trail
    took 4.8 s a pass at 200,000 requests (benchmarks/scale.py). The candidates are locked, skipping
    those another transaction holds (another sweep flagging them, a worker settling them: this sweep
    never waits for either), and each is asked again once locked, so two sweeps that overlap write
    each flag once."""
    def flagged(request_id, event: str):
        return exists().where(AuditEvent.request_id == request_id, AuditEvent.event == event)

    def flag(event: str, line: str) -> None:
        # The dashboard's rule for at risk and overdue (service.deletion_requests.service.filtered).
        due = filtered(RequestFilter(**{event: True}), now)
        candidates = (due.where(~flagged(DeletionRequest.id, event))
                      .order_by(DeletionRequest.due_at, DeletionRequest.id).with_for_update(skip_locked=True))
        for row in session.scalars(candidates).all():
            # Locked now; a statement of its own sees what a sweep that held the row committed.
            if session.scalar(select(flagged(row.id, event))):
                continue
            record(session=session, request=row, event=event, actor="sweep", detail={"due_at": row.due_at.isoformat()})
            log.warning(line, row.id, row.external_id, row.due_at)
            counts[event] += 1

    flag("overdue", "deletion request %s (%s) is overdue since %s")
    flag("at_risk", "deletion request %s (%s) is at risk: due %s")
