"""Deletion requests and their append-only audit trail."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from service.db import Base, UTCDateTime, utcnow
from service.registry.models import RegisteredModel, ModelVersion, new_id


class RequestStatus(StrEnum):
    RECEIVED = "received"
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"  # the new version is published
    PROPAGATED = "propagated"  # and every consumer of the model has acknowledged serving it (or a later one)
    FAILED = "failed"
    REJECTED = "rejected"
    CANCELED = "canceled"


# No run is left to do (nothing to cancel, claim or retry).
FINISHED = frozenset({RequestStatus.COMPLETED, RequestStatus.PROPAGATED, RequestStatus.FAILED, RequestStatus.REJECTED,
                      RequestStatus.CANCELED})
# A version without the class is published: what later runs re-check, what a certificate states.
FULFILLED = frozenset({RequestStatus.COMPLETED, RequestStatus.PROPAGATED})
# The legal deadline still counts: an erasure is done when no consumer serves a version that holds
# the class any more, not when that version is published.
DEADLINE_OPEN = frozenset({RequestStatus.RECEIVED, RequestStatus.QUEUED, RequestStatus.RUNNING,
                           RequestStatus.COMPLETED})


class DeletionRequest(Base):
    __tablename__ = "deletion_requests"
    __table_args__ = (
        UniqueConstraint("model_id", "external_id", name="uq_deletion_requests_model_external_id"),
        # Stripe's rule: an Idempotency-Key is the sender's (created_by names the API key), so two
        # clients that happen to pick the same key never see each other's requests.
        UniqueConstraint("created_by", "idempotency_key", name="uq_deletion_requests_idempotency_scope"),
        # GET /deletion-requests pages oldest first by (created_at, id), alone or by status or model:
        # without these, each page sorted every matching row (200,000 rows: 180-240 ms a page,
        # benchmarks/scale.py); with them it reads one page's rows off the index.
        Index("ix_deletion_requests_created_at_id", "created_at", "id"),
        Index("ix_deletion_requests_status_created_at_id", "status", "created_at", "id"),
        Index("ix_deletion_requests_model_created_at_id", "model_id", "created_at", "id"),
        # The dashboard's and /metrics' at-risk and overdue counts read the open requests' deadlines
        # off this index alone (13-18 ms each at 200,000 requests without it, 1-2 ms with it).
        Index("ix_deletion_requests_status_due_at", "status", "due_at", "at_risk_from"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    external_id: Mapped[str] = mapped_column(String(200))
    model_id: Mapped[str] = mapped_column(String(36), ForeignKey("registered_models.id"))
    forget_class: Mapped[str] = mapped_column(String(200))
    forget_uri: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default=RequestStatus.RECEIVED, index=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    due_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    at_risk_from: Mapped[datetime] = mapped_column(UTCDateTime)  # when less than 25 % of the window is left
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    queued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    propagated_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    extended_days: Mapped[int] = mapped_column(Integer, default=0)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    body_sha256: Mapped[str] = mapped_column(String(64))  # what the idempotency key was first used with
    seed: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # Set when a batch holding this request failed: it then runs in a batch of its own, so that a
    # request whose images break a run fails alone and the others of that batch are not held back.
    run_alone: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    fulfilled_version_id: Mapped[str | None] = mapped_column(String(36), ForeignKey("model_versions.id"))
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    created_by: Mapped[str | None] = mapped_column(String(200))
    # Every UPDATE of a row is compare-and-set on this counter (SQLAlchemy's version_id_col: it adds
    # ``AND row_version = :seen`` and raises StaleDataError when another transaction changed the row
    # since it was read): a status read before a concurrent cancel, claim or extension can never be
    # written back over it. Bulk ``update()`` statements bypass it; those carry their own WHERE.
    row_version: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    # Redaction (service/redaction.py): the salt its certificates carry, and what stays of its class
    # and forget set once they are redacted (a salted sha256).
    subject_nonce: Mapped[str | None] = mapped_column(String(64))
    subject_commitment: Mapped[str | None] = mapped_column(String(64))
    redacted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __mapper_args__ = {"version_id_col": row_version}

    model: Mapped[RegisteredModel] = relationship()
    fulfilled_version: Mapped[ModelVersion | None] = relationship()
    events: Mapped[list[AuditEvent]] = relationship(
        primaryjoin="DeletionRequest.id == foreign(AuditEvent.request_id)", order_by="AuditEvent.id", viewonly=True)


class AuditEvent(Base):
    """Append-only: who or what did what to a request, when, from which status to which."""

    __tablename__ = "audit_events"
    __table_args__ = (
        # The sweep asks which requests at risk still lack their flag (worker.runs.sweep.flag_deadlines); this index holds only the flags
        # (a few per cent of the trail), so the answer does not read the trail of every request.
        Index("ix_audit_events_deadline_flags", "request_id", "event",
              postgresql_where=text("event IN ('at_risk', 'overdue')"),
              sqlite_where=text("event IN ('at_risk', 'overdue')")),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # No foreign key: the trail must outlive the request row.
    request_id: Mapped[str] = mapped_column(String(36), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    actor: Mapped[str] = mapped_column(String(200))
    event: Mapped[str] = mapped_column(String(40))
    from_status: Mapped[str | None] = mapped_column(String(16))
    to_status: Mapped[str | None] = mapped_column(String(16))
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # A hash chain per request (service.deletion_requests.audit_chain): the previous event's sha256,
    # and this event's over its fields and that one. Events written before the chain have neither.
    prev_sha256: Mapped[str | None] = mapped_column(String(64))
    sha256: Mapped[str | None] = mapped_column(String(64))


class RunDurationCounter(Base):
    """One counter of the run-duration histogram (service.deletion_requests.run_durations)."""

    __tablename__ = "run_duration_counters"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)  # "count", "sum" or a bucket, "le:60.0"
    value: Mapped[float] = mapped_column(Float, nullable=False, default=0.0)
