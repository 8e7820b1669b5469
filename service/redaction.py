"""Redaction: ``LETHE_REDACT_AFTER_DAYS`` after a request finished, its class name and forget-set
URI are replaced on its row by ``redacted``, and what stays of them is a salted sha256 (the
commitment, ``personal_data.commitment``) whose salt only the request's certificates carry.

What else changes, in the same transaction: the row's error and metrics lose every mention of the
class and the forget set (metrics keyed by class name are re-keyed), the certificates issued so far
lose their signed text (the requester holds their copies; the table keeps each one's id, time and
key), and the request's audit trail gains a ``redacted`` event. The trail itself never held either
(``transitions.record`` scrubs every event's detail), so its chain still verifies. The model's own
records (its card's class list, each version's classes forgotten) name classes, not requests: a
model that has a head for a person names them, and they stay.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.certificates.models import Certificate
from service.deletion_requests.models import FINISHED, DeletionRequest
from service.deletion_requests.personal_data import REDACTED, commitment, rekey, scrub, scrub_detail
from service.deletion_requests.transitions import record


def redact_due(session: Session, now: datetime, after_days: float, limit: int | None = None) -> int:
    """Redact the requests finished at least ``after_days`` ago and not redacted yet, the longest
    finished first, at most ``limit`` of them; returns how many."""
    due = session.scalars(select(DeletionRequest).where(
        DeletionRequest.status.in_(list(FINISHED)), DeletionRequest.finished_at <= now - timedelta(days=after_days),
        DeletionRequest.redacted_at.is_(None)).order_by(DeletionRequest.finished_at, DeletionRequest.id)
        .limit(limit).with_for_update(skip_locked=True)).all()
    for row in due:
        redact(session, row, now, after_days)
    return len(due)


def redact(session: Session, row: DeletionRequest, now: datetime, after_days: float) -> None:
    nonce = row.subject_nonce or secrets.token_hex(16)  # requests older than nonces get one, never shown
    named = {"classes": [row.forget_class], "uris": [row.forget_uri]}
    row.subject_commitment = commitment(nonce, row.forget_class, row.forget_uri)
    row.error = scrub(row.error, **named) if row.error else row.error
    row.metrics = scrub_detail(rekey(row.metrics, row.forget_class), **named) if row.metrics else row.metrics
    row.forget_class = row.forget_uri = REDACTED
    row.subject_nonce, row.redacted_at = None, now
    for issued in session.scalars(select(Certificate).where(Certificate.request_id == row.id)):
        # The content digest too: it hashes statements that named the class, and a class list is short.
        session.execute(update(Certificate).where(Certificate.id == issued.id).values(
            token="", content_sha256=hashlib.sha256(f"{nonce}\n{issued.content_sha256}".encode()).hexdigest()))
    record(session=session, request=row, event="redacted", actor="sweep",
           detail={"after_days": after_days, "kept": "a salted sha256 of the class and forget set"})


def purge_old_pages(url: str) -> None:
    """After a redaction has committed: on SQLite, copy the write-ahead log into the database and
    truncate it, so the pages that held the redacted values (kept in the log until a checkpoint)
    are gone from disk (with secure_delete, service/db.py). On Postgres, the old row versions stay
    until VACUUM reclaims them (autovacuum, or the operator's schedule): the README says so."""
    if not url.startswith("sqlite"):
        return
    from service.db import engine_for

    raw = engine_for(url).raw_connection()  # outside any transaction: a checkpoint cannot run inside one
    try:
        raw.driver_connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    finally:
        raw.close()
