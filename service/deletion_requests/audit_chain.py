"""The audit trail as a hash chain per request: each event's sha256 covers its fields (canonical
JSON) and the previous event's sha256, so an event edited, removed or slipped in afterwards, even
directly in the database, breaks the chain at that point (``lethe audit verify`` names where). The
head of a request's chain is what a certificate of its erasure commits to.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.deletion_requests.models import AuditEvent, DeletionRequest


def digest(event: AuditEvent, prev_sha256: str | None) -> str:
    fields = {"request_id": event.request_id, "at": event.at.isoformat(), "actor": event.actor, "event": event.event,
              "from_status": event.from_status, "to_status": event.to_status, "detail": event.detail,
              "prev_sha256": prev_sha256}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def link(session: Session, event: AuditEvent) -> None:
    """Chain a new event to its request's last one. The request row is locked first (Postgres), so
    two transactions adding events to one request take turns instead of forking its chain."""
    session.execute(select(DeletionRequest.id).where(DeletionRequest.id == event.request_id).with_for_update())
    prev = session.scalar(select(AuditEvent.sha256).where(AuditEvent.request_id == event.request_id)
                          .order_by(AuditEvent.id.desc()).limit(1))
    event.prev_sha256 = prev
    event.sha256 = digest(event, prev)


def head(session: Session, request_id: str) -> str | None:
    return session.scalar(select(AuditEvent.sha256).where(AuditEvent.request_id == request_id)
                          .order_by(AuditEvent.id.desc()).limit(1))


@dataclass(frozen=True)
class Break:
    request_id: str
    event_id: int
    why: str

    def __str__(self) -> str:
        return f"request {self.request_id}, event {self.event_id}: {self.why}"


def verify(session: Session) -> tuple[int, int, list[Break]]:
    """(chains, events checked, breaks) over every request's trail, in the order it was written."""
    breaks: list[Break] = []
    chains = checked = 0
    last: dict[str, str | None] = {}
    events = select(AuditEvent).order_by(AuditEvent.request_id, AuditEvent.id).execution_options(yield_per=1000)
    for event in session.scalars(events):  # streamed: the trail of 200,000 requests does not fit at once
        if event.sha256 is None and event.request_id not in last:
            continue  # written before the chain existed
        if event.request_id not in last:
            chains += 1
            last[event.request_id] = None
        checked += 1
        if event.sha256 is None:
            breaks.append(Break(event.request_id, event.id, "an event without a hash inside the chain"))
        elif event.prev_sha256 != last[event.request_id]:
            breaks.append(Break(event.request_id, event.id, "does not follow the event before it (one was "
                                                             "removed, inserted or reordered)"))
        elif digest(event, event.prev_sha256) != event.sha256:
            breaks.append(Break(event.request_id, event.id, "its fields were changed after it was written"))
        last[event.request_id] = event.sha256
    return chains, checked, breaks
