"""Deletion requests: accept, read, list, cancel, retry, extend. Plain functions; callers commit."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Select, and_, select, tuple_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, joinedload

from service.config import Settings
from service.db import on_commit, utcnow
from service.deadlines import at_risk_from
from service.deletion_requests.models import DEADLINE_OPEN, DeletionRequest, RequestStatus as S
from service.deletion_requests.schemas import DeletionRequestCreate, ExtendBody, in_utc
from service.deletion_requests.transitions import record, transition
from service.errors import AttemptsExhausted, Conflict, IdempotencyMismatch, InvalidInput, InvalidTransition, NotFound
from service.registry.models import RegisteredModel
from service.registry.service import current_version
from service.sources import check_data_root

ACTIVE = (S.RECEIVED, S.QUEUED, S.RUNNING)
# A page of requests shows each one's model name and fulfilled version number: loaded with the page
# (one statement), not one SELECT per row (~85 a page at 200,000 requests, benchmarks/scale.py).
WITH_NAMES = (joinedload(DeletionRequest.model), joinedload(DeletionRequest.fulfilled_version))


def body_digest(body: DeletionRequestCreate) -> str:
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def submit(*, session: Session, settings: Settings, body: DeletionRequestCreate, idempotency_key: str | None,
           actor: str, enqueue) -> tuple[DeletionRequest, bool]:
    """Accept a request (received -> queued) and enqueue it after commit; returns (request, created).

    The same Idempotency-Key with the same body returns the first request; with another body, 422.
    """
    digest = body_digest(body)
    if idempotency_key is not None:
        existing = _by_idempotency_key(session, actor, idempotency_key, digest)
        if existing is not None:
            return existing, False
    model = session.scalar(select(RegisteredModel).where(RegisteredModel.name == body.model))
    if model is None:
        raise InvalidInput(f"unknown model {body.model!r}")
    _check_class(session, model, body.forget_class)
    check_data_root(body.forget_set.uri, settings.allowed_data_roots)
    now = utcnow()
    received_at = body.received_at or now
    if received_at > now + timedelta(minutes=5):
        raise InvalidInput("received_at lies in the future")
    due_at = settings.deadline_period.after(received_at)  # fixed now: a later change of the setting moves nothing
    request = DeletionRequest(
        external_id=body.external_id, model_id=model.id, forget_class=body.forget_class,
        forget_uri=body.forget_set.uri, status=S.RECEIVED, received_at=received_at, due_at=due_at,
        at_risk_from=at_risk_from(received_at, due_at), created_at=now, updated_at=now, idempotency_key=idempotency_key,
        body_sha256=digest, seed=0, created_by=actor, subject_nonce=secrets.token_hex(16))
    try:
        with session.begin_nested():  # a concurrent twin may win the unique constraints
            session.add(request)
            session.flush()
    except IntegrityError:
        if idempotency_key is not None:
            existing = _by_idempotency_key(session, actor, idempotency_key, digest)
            if existing is not None:
                return existing, False
        raise Conflict(f"model {body.model!r} already has a request with external_id {body.external_id!r}") from None
    record(session=session, request=request, event="created", actor=actor, to_status=S.RECEIVED,
           detail={"due_at": due_at.isoformat(), "idempotency_key": idempotency_key})
    transition(session=session, request=request, to=S.QUEUED, actor=actor)
    on_commit(session, lambda request_id=request.id: enqueue(request_id))
    return request, True


def _by_idempotency_key(session: Session, actor: str, key: str, digest: str) -> DeletionRequest | None:
    """The request this sender made with this key, if any (keys are scoped to their sender)."""
    existing = session.scalar(select(DeletionRequest).where(DeletionRequest.created_by == actor,
                                                            DeletionRequest.idempotency_key == key))
    if existing is not None and existing.body_sha256 != digest:
        raise IdempotencyMismatch("this Idempotency-Key was used with a different body")
    return existing


def _check_class(session: Session, model: RegisteredModel, forget_class: str) -> None:
    version = current_version(session=session, model=model)
    classes = list(version.card.get("classes", []))
    if forget_class not in classes:
        # Not the list of classes: in a face model they are people, and this caller may not read models.
        raise InvalidInput(f"model {model.name!r} has no class {forget_class!r}")
    pending = set(session.scalars(select(DeletionRequest.forget_class).distinct().where(
        DeletionRequest.model_id == model.id, DeletionRequest.status.in_(ACTIVE))).all())
    remaining = set(classes) - set(version.classes_forgotten) - pending - {forget_class}
    if not remaining:
        raise InvalidInput(f"forgetting {forget_class!r} would leave model {model.name!r} no class to predict")


def get_request(*, session: Session, request_id: str, for_update: bool = False) -> DeletionRequest:
    """The request; ``for_update`` to change it: the row stays locked (Postgres) until the transaction
    ends, so a worker's claim skips it and a concurrent change waits and then sees this one."""
    try:
        request_id = str(uuid.UUID(request_id))
    except ValueError:
        raise NotFound(f"no deletion request {request_id!r}") from None
    request = session.get(DeletionRequest, request_id, with_for_update=True if for_update else None)
    if request is None:
        raise NotFound(f"no deletion request {request_id!r}")
    return request


@dataclass(frozen=True)
class RequestFilter:
    status: list[str] | None = None
    model: str | None = None
    at_risk: bool | None = None
    overdue: bool | None = None
    due_before: datetime | None = None


def filtered(filters: RequestFilter, now: datetime | None = None) -> Select:
    """The requests matching ``filters``: the one definition of each filter."""
    now = now or utcnow()
    query = select(DeletionRequest)
    if filters.status:
        unknown = set(filters.status) - {s.value for s in S}
        if unknown:
            raise InvalidInput(f"unknown status {', '.join(sorted(unknown))}")
        query = query.where(DeletionRequest.status.in_(filters.status))
    if filters.model:
        # The model's id, not a join: a count or page of every request then reads only their index.
        query = query.where(DeletionRequest.model_id == select(RegisteredModel.id)
                            .where(RegisteredModel.name == filters.model).scalar_subquery())
    active = DeletionRequest.status.in_(DEADLINE_OPEN)
    is_overdue = and_(active, DeletionRequest.due_at < now)
    is_at_risk = and_(active, DeletionRequest.at_risk_from <= now, DeletionRequest.due_at >= now)
    if filters.overdue is not None:
        query = query.where(is_overdue if filters.overdue else ~is_overdue)
    if filters.at_risk is not None:
        query = query.where(is_at_risk if filters.at_risk else ~is_at_risk)
    if filters.due_before is not None:
        query = query.where(DeletionRequest.due_at < filters.due_before)
    return query


def list_requests(*, session: Session, filters: RequestFilter, limit: int, cursor: str | None
                  ) -> tuple[list[DeletionRequest], str | None]:
    """Requests oldest first (created_at, id), ``limit`` at a time; the cursor names the last one seen."""
    query = filtered(filters)
    if cursor:
        created_at, last_id = decode_cursor(cursor)
        # A row-value comparison, which both databases answer by a range scan of the (created_at, id)
        # index; the equivalent OR of two conditions made Postgres read the index from its start.
        query = query.where(tuple_(DeletionRequest.created_at, DeletionRequest.id) > tuple_(created_at, last_id))
    rows = session.scalars(query.options(*WITH_NAMES).order_by(DeletionRequest.created_at, DeletionRequest.id)
                           .limit(limit + 1)).all()
    page, more = rows[:limit], len(rows) > limit
    return page, (encode_cursor(page[-1]) if more else None)


def encode_cursor(request: DeletionRequest) -> str:
    raw = json.dumps([request.created_at.isoformat(), request.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        created_at, last_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        created_at = datetime.fromisoformat(created_at)
        if created_at.tzinfo is None:
            raise ValueError("naive")
        return in_utc(created_at), str(uuid.UUID(str(last_id)))
    except (ValueError, TypeError) as exc:
        raise InvalidInput("malformed cursor") from exc


def cancel(*, session: Session, request: DeletionRequest, actor: str, reason: str | None) -> DeletionRequest:
    """Waiting requests are canceled at once; a running one stops at its next training step."""
    if request.status == S.RUNNING:
        request.cancel_requested = True
        record(session=session, request=request, event="cancel_requested", actor=actor, detail={"reason": reason})
        return request
    return transition(session=session, request=request, to=S.CANCELED, actor=actor, detail={"reason": reason})


def retry(*, session: Session, settings: Settings, request: DeletionRequest, actor: str, enqueue) -> DeletionRequest:
    """A failed request runs again, with a new seed, unless it ran LETHE_MAX_ATTEMPTS times already:
    each run takes a worker for minutes, and one whose images fail every run would take it forever.
    The seed is the training's; the generalisation check keeps its own (worker.runs.train.CHECK_SEED)."""
    if request.status != S.FAILED:  # running -> queued exists for lost leases, not for callers
        raise InvalidTransition(f"only a failed request can be retried; this one is {request.status}",
                                current_status=request.status)
    if request.attempts >= settings.max_attempts:
        raise AttemptsExhausted(f"this request ran {request.attempts} times (LETHE_MAX_ATTEMPTS is "
                                f"{settings.max_attempts}); fix what its error names and send a new request",
                                attempts=request.attempts)
    seed = secrets.randbelow(2**31)
    transition(session=session, request=request, to=S.QUEUED, actor=actor, detail={"seed": seed, "retry": True})
    request.seed, request.error, request.cancel_requested = seed, None, False
    on_commit(session, lambda request_id=request.id: enqueue(request_id))
    return request


def extend(*, session: Session, settings: Settings, request: DeletionRequest, body: ExtendBody,
           actor: str) -> DeletionRequest:
    """GDPR Art. 12(3): the deadline may be extended by up to two further months, with a reason."""
    if request.status not in DEADLINE_OPEN:
        raise Conflict(f"a {request.status} request has no deadline to extend", current_status=request.status)
    if request.extended_days + body.days > settings.max_extension_days:
        raise InvalidInput(f"extensions may add at most {settings.max_extension_days} days in all; "
                           f"{request.extended_days} used")
    request.extended_days += body.days
    # From the due date the request was given, never recomputed from today's LETHE_DEADLINE.
    request.due_at += timedelta(days=body.days)
    request.at_risk_from = at_risk_from(request.received_at, request.due_at)
    request.updated_at = utcnow()
    record(session=session, request=request, event="extended", actor=actor,
           detail={"days": body.days, "reason": body.reason, "due_at": request.due_at.isoformat()})
    return request


def deadline_state(request: DeletionRequest, now: datetime | None = None) -> tuple[int | None, bool, bool]:
    """(days_left, at_risk, overdue); none once the deadline stopped counting (propagated, or ended
    without an erasure). ``request`` is a row or anything with its status, due_at and at_risk_from
    (a result row of those columns: the CSV export reads no ORM objects)."""
    if request.status not in DEADLINE_OPEN:
        return None, False, False
    now = now or utcnow()
    seconds = (request.due_at - now).total_seconds()
    overdue = seconds < 0
    # "12 days left" counts whole days still available; "3 days overdue" whole days late (at least 1).
    days_left = -max(1, int(-seconds // 86400)) if overdue else int(seconds // 86400)
    return days_left, (not overdue and now >= request.at_risk_from), overdue
