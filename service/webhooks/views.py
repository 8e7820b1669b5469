"""Webhook endpoints (scope ``webhooks:write``): thin wrappers over ``service``."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from service.deps import SessionDep, SettingsDep, WebhooksWriter
from service.webhooks import service
from service.webhooks.service import EVENTS

router = APIRouter(prefix="/webhooks", tags=["webhooks"])


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=2000, description="https://... on a host in LETHE_WEBHOOK_ALLOWED_HOSTS")
    events: list[str] = Field(min_length=1, max_length=len(EVENTS), description=", ".join(EVENTS))


class WebhookPublic(BaseModel):
    id: str
    url: str
    events: list[str]
    created_at: datetime
    created_by: str | None


class WebhookCreated(WebhookPublic):
    secret: str = Field(description="whsec_...: verifies each delivery's webhook-signature; shown only now")


class DeliveryPublic(BaseModel):
    id: int
    message_id: str = Field(description="the webhook-id header: the same on every attempt")
    event_type: str
    status: str
    attempts: int
    created_at: datetime
    next_attempt_at: datetime
    delivered_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    last_latency_ms: int | None


def public(webhook) -> WebhookPublic:
    return WebhookPublic.model_validate(webhook, from_attributes=True)


@router.post("", status_code=201, response_model=WebhookCreated, summary="Subscribe a URL to events; the secret is shown once")
def create(body: WebhookCreate, session: SessionDep, settings: SettingsDep, key: WebhooksWriter) -> WebhookCreated:
    webhook = service.register(session=session, url=body.url, events=body.events,
                               allowed_hosts=settings.webhook_hosts, actor=f"api-key:{key.name}")
    return WebhookCreated(**public(webhook).model_dump(), secret=webhook.secret)


@router.get("", response_model=list[WebhookPublic], summary="Live webhooks")
def listing(session: SessionDep, _key: WebhooksWriter) -> list[WebhookPublic]:
    return [public(w) for w in service.listing(session=session)]


@router.get("/{webhook_id}", response_model=WebhookPublic)
def get(webhook_id: str, session: SessionDep, _key: WebhooksWriter) -> WebhookPublic:
    return public(service.get(session=session, webhook_id=webhook_id))


@router.delete("/{webhook_id}", status_code=204, summary="Stop a webhook (pending deliveries too); its log stays")
def delete(webhook_id: str, session: SessionDep, _key: WebhooksWriter) -> Response:
    service.delete(session=session, webhook_id=webhook_id)
    return Response(status_code=204)


@router.get("/{webhook_id}/deliveries", response_model=list[DeliveryPublic], summary="The delivery log, newest first")
def deliveries(webhook_id: str, session: SessionDep, _key: WebhooksWriter,
               limit: Annotated[int, Query(ge=1, le=500)] = 100) -> list[DeliveryPublic]:
    return [DeliveryPublic.model_validate(d, from_attributes=True)
            for d in service.deliveries(session=session, webhook_id=webhook_id, limit=limit)]


@router.post("/{webhook_id}/deliveries/{delivery_id}/redeliver", status_code=202, response_model=DeliveryPublic,
             summary="Send a delivery again (same webhook-id)")
def redeliver(webhook_id: str, delivery_id: int, session: SessionDep, _key: WebhooksWriter) -> DeliveryPublic:
    delivery = service.redeliver(session=session, webhook_id=webhook_id, delivery_id=delivery_id)
    return DeliveryPublic.model_validate(delivery, from_attributes=True)
