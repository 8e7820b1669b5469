"""The one place a deletion request's status changes: allowed moves, timestamps and the audit event."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from service.db import utcnow
from service.deletion_requests import run_durations
from service.deletion_requests.audit_chain import link
from service.deletion_requests.personal_data import scrub_detail
from service.deletion_requests.models import AuditEvent, DeletionRequest, RequestStatus as S
from service.errors import InvalidTransition
from service.webhooks.service import REQUEST_EVENTS, emit

ALLOWED: dict[str, set[str]] = {
    S.RECEIVED: {S.QUEUED, S.REJECTED, S.CANCELED},
    S.QUEUED: {S.RUNNING, S.COMPLETED, S.REJECTED, S.CANCELED},
    S.RUNNING: {S.COMPLETED, S.FAILED, S.REJECTED, S.CANCELED, S.QUEUED},  # queued: lease lost, run again
    S.FAILED: {S.QUEUED},  # retry
    S.COMPLETED: {S.PROPAGATED},  # every consumer serves the new version (service/consumers/propagation.py)
    S.PROPAGATED: set(),
    S.REJECTED: set(),
    S.CANCELED: set(),
}
TIMESTAMPS = {S.QUEUED: "queued_at", S.RUNNING: "started_at", S.COMPLETED: "finished_at", S.FAILED: "finished_at",
              S.REJECTED: "finished_at", S.CANCELED: "finished_at", S.PROPAGATED: "propagated_at"}


def transition(*, session: Session, request: DeletionRequest, to: S, actor: str,
               detail: dict[str, Any] | None = None) -> DeletionRequest:
    """Move ``request`` to ``to`` (or fail with 409), stamp the time and append an audit event."""
    current = request.status
    if to not in ALLOWED[current]:
        raise InvalidTransition(f"a {current} request cannot become {to}", current_status=current)
    now = utcnow()
    if current == S.RUNNING and to in (S.COMPLETED, S.FAILED) and request.started_at is not None:
        run_durations.observe(session, (now - request.started_at).total_seconds())
    request.status = to
    request.updated_at = now
    setattr(request, TIMESTAMPS[to], now)
    if to in (S.QUEUED, S.FAILED, S.REJECTED, S.CANCELED, S.COMPLETED):
        request.lease_owner = request.lease_expires_at = None
    record(session=session, request=request, event=f"status:{to}", actor=actor, from_status=current, to_status=to,
           detail=detail)
    return request


def record(*, session: Session, request: DeletionRequest, event: str, actor: str, from_status: str | None = None,
           to_status: str | None = None, detail: dict[str, Any] | None = None) -> AuditEvent:
    """Append an audit event that changes no status (created, extended, overdue, re-checked ...)."""
    # The trail outlives redaction and cannot be edited (its chain), so it never holds the request's
    # class name or forget-set reference, whatever a caller passes in an error or reason.
    detail = scrub_detail(detail, classes=[request.forget_class], uris=[request.forget_uri]) if detail else detail
    row = AuditEvent(request_id=request.id, at=utcnow(), actor=actor, event=event, from_status=from_status,
                     to_status=to_status, detail=detail)
    session.flush()  # the request (and its earlier events) first: the chain links to what is stored
    link(session, row)
    session.add(row)
    session.flush()
    announce(session, request, to_status if event.startswith("status:") else event, row.at)
    return row


def announce(session: Session, request: DeletionRequest, kind: str | None, at) -> None:
    """The webhook event of a status change or deadline flag, into the outbox in this transaction:
    ids, status, version and times, never the class name or forget set (personal data)."""
    event_type = f"deletion_request.{kind}"
    if event_type not in REQUEST_EVENTS:
        return
    version = request.fulfilled_version.version if request.fulfilled_version_id and request.fulfilled_version else None
    emit(session, event_type, {
        "id": request.id, "external_id": request.external_id, "model": request.model.name, "status": request.status,
        "version": version, "received_at": _iso(request.received_at), "due_at": _iso(request.due_at),
        "finished_at": _iso(request.finished_at)}, at)


def _iso(value) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None
