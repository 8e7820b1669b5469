"""Deletion-request endpoints: thin wrappers over ``service``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Header, Query, Request, Response

from service.deletion_requests import service
from service.deletion_requests.models import DeletionRequest
from service.deletion_requests.schemas import (
    UtcDatetime,
    AuditEventPublic,
    CancelBody,
    DeletionRequestAccepted,
    DeletionRequestCreate,
    DeletionRequestPage,
    DeletionRequestPublic,
    ExtendBody,
    ForgetSetRef,
)
from service.deps import RequestsReader, RequestsWriter, SessionDep, SettingsDep
from service.registry.service import NAME_PATTERN

router = APIRouter(prefix="/deletion-requests", tags=["deletion requests"])


def enqueue_of(request: Request):
    return request.app.state.enqueue


def to_public(row: DeletionRequest, with_events: bool = True) -> DeletionRequestPublic:
    days_left, at_risk, overdue = service.deadline_state(row)
    version = row.fulfilled_version
    return DeletionRequestPublic(
        id=row.id, external_id=row.external_id, model=row.model.name, forget_class=row.forget_class,
        forget_set=ForgetSetRef(uri=row.forget_uri), status=row.status, received_at=row.received_at,
        created_at=row.created_at, updated_at=row.updated_at, queued_at=row.queued_at, started_at=row.started_at,
        finished_at=row.finished_at, due_at=row.due_at, days_left=days_left, at_risk=at_risk, overdue=overdue,
        extended_days=row.extended_days, attempts=row.attempts, fulfilled_version=version.version if version else None,
        metrics=row.metrics, error=row.error, redacted_at=row.redacted_at,
        events=[AuditEventPublic.model_validate(e, from_attributes=True) for e in row.events] if with_events else [],
    )


@router.post("", status_code=202, response_model=DeletionRequestAccepted,
             summary="Accept a deletion request; it is queued and processed by a worker")
def submit(body: DeletionRequestCreate, request: Request, response: Response, session: SessionDep,
           settings: SettingsDep, key: RequestsWriter,
           idempotency_key: Annotated[str | None, Header(max_length=200)] = None) -> DeletionRequestAccepted:
    row, _created = service.submit(session=session, settings=settings, body=body, idempotency_key=idempotency_key,
                                   actor=f"api-key:{key.name}", enqueue=enqueue_of(request))
    response.headers["Location"] = f"/deletion-requests/{row.id}"
    return DeletionRequestAccepted(id=row.id, status=row.status, due_at=row.due_at)


@router.get("", response_model=DeletionRequestPage, summary="Requests, oldest first, with filters and a cursor")
def list_requests(session: SessionDep, _key: RequestsReader,
                  status: Annotated[list[str] | None, Query()] = None,
                  model: Annotated[str | None, Query(pattern=NAME_PATTERN.pattern)] = None,
                  at_risk: bool | None = None, overdue: bool | None = None,
                  due_before: UtcDatetime | None = None,
                  limit: Annotated[int, Query(ge=1, le=200)] = 50,
                  cursor: Annotated[str | None, Query(max_length=500)] = None) -> DeletionRequestPage:
    filters = service.RequestFilter(status=status, model=model, at_risk=at_risk, overdue=overdue, due_before=due_before)
    rows, next_cursor = service.list_requests(session=session, filters=filters, limit=limit, cursor=cursor)
    return DeletionRequestPage(items=[to_public(r, with_events=False) for r in rows], next_cursor=next_cursor)


@router.get("/{request_id}", response_model=DeletionRequestPublic, summary="One request with its audit trail")
def get_request(request_id: str, session: SessionDep, _key: RequestsReader) -> DeletionRequestPublic:
    return to_public(service.get_request(session=session, request_id=request_id))


@router.post("/{request_id}/cancel", response_model=DeletionRequestPublic,
             summary="Cancel; a running request stops at its next training step")
def cancel(request_id: str, session: SessionDep, key: RequestsWriter,
           body: Annotated[CancelBody | None, Body()] = None) -> DeletionRequestPublic:
    row = service.get_request(session=session, request_id=request_id, for_update=True)
    service.cancel(session=session, request=row, actor=f"api-key:{key.name}", reason=body.reason if body else None)
    return to_public(row)


@router.post("/{request_id}/retry", response_model=DeletionRequestPublic, summary="Run a failed request again (new seed)")
def retry(request_id: str, request: Request, session: SessionDep, settings: SettingsDep,
          key: RequestsWriter) -> DeletionRequestPublic:
    row = service.get_request(session=session, request_id=request_id, for_update=True)
    service.retry(session=session, settings=settings, request=row, actor=f"api-key:{key.name}",
                  enqueue=enqueue_of(request))
    return to_public(row)


@router.post("/{request_id}/extend", response_model=DeletionRequestPublic,
             summary="Extend the deadline (GDPR Art. 12(3): up to two more months, with a reason)")
def extend(request_id: str, body: ExtendBody, session: SessionDep, settings: SettingsDep,
           key: RequestsWriter) -> DeletionRequestPublic:
    row = service.get_request(session=session, request_id=request_id, for_update=True)
    service.extend(session=session, settings=settings, request=row, body=body, actor=f"api-key:{key.name}")
    return to_public(row)
