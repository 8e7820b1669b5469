"""Webhook subscriptions, and ``emit``: the one place an event enters the outbox, in the caller's
transaction (a crash cannot lose an event whose change committed, nor invent one whose change
rolled back)."""

from __future__ import annotations

import base64
import secrets
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.db import utcnow
from service.errors import InvalidInput, NotFound
from service.webhooks.models import Webhook, WebhookDelivery
from service.webhooks.targets import check_target

REQUEST_EVENTS = tuple(f"deletion_request.{s}" for s in (
    "queued", "running", "completed", "propagated", "failed", "rejected", "canceled", "at_risk", "overdue"))
EVENTS = REQUEST_EVENTS + ("model.version_published",)


def register(*, session: Session, url: str, events: list[str], allowed_hosts: list[str], actor: str
             ) -> Webhook:
    unknown = sorted(set(events) - set(EVENTS))
    if not events or unknown:
        raise InvalidInput(f"events must be among {', '.join(EVENTS)}" + (f"; unknown: {', '.join(unknown)}" if unknown else ""))
    check_target(url, allowed_hosts)
    webhook = Webhook(url=url, events=sorted(set(events)), created_by=actor,
                      secret="whsec_" + base64.b64encode(secrets.token_bytes(24)).decode())
    session.add(webhook)
    session.flush()
    return webhook


def get(*, session: Session, webhook_id: str) -> Webhook:
    webhook = session.get(Webhook, webhook_id) if _is_uuid(webhook_id) else None
    if webhook is None or webhook.deleted_at is not None:
        raise NotFound(f"no webhook {webhook_id}")
    return webhook


def listing(*, session: Session) -> list[Webhook]:
    return list(session.scalars(select(Webhook).where(Webhook.deleted_at.is_(None)).order_by(Webhook.created_at)))


def delete(*, session: Session, webhook_id: str) -> None:
    """The webhook stops: nothing more is sent to it, pending deliveries included; its log stays."""
    webhook = get(session=session, webhook_id=webhook_id)
    webhook.deleted_at = utcnow()
    session.execute(update(WebhookDelivery).where(WebhookDelivery.webhook_id == webhook.id,
                                                  WebhookDelivery.status == "pending")
                    .values(status="failed", last_error="the webhook was deleted"))


def deliveries(*, session: Session, webhook_id: str, limit: int = 100) -> list[WebhookDelivery]:
    get(session=session, webhook_id=webhook_id)
    return list(session.scalars(select(WebhookDelivery).where(WebhookDelivery.webhook_id == webhook_id)
                                .order_by(WebhookDelivery.id.desc()).limit(limit)))


def redeliver(*, session: Session, webhook_id: str, delivery_id: int) -> WebhookDelivery:
    """Send a delivery again (same ``webhook-id``: a receiver that has it already ignores it)."""
    get(session=session, webhook_id=webhook_id)
    delivery = session.get(WebhookDelivery, delivery_id)
    if delivery is None or delivery.webhook_id != webhook_id:
        raise NotFound(f"no delivery {delivery_id} of webhook {webhook_id}")
    delivery.status, delivery.next_attempt_at, delivery.created_at = "pending", utcnow(), utcnow()
    return delivery


def emit(session: Session, event_type: str, data: dict[str, Any], at: datetime | None = None) -> int:
    """Add the event to the outbox of every live webhook subscribed to it; returns how many."""
    at = at or utcnow()
    payload = {"type": event_type, "timestamp": at.isoformat().replace("+00:00", "Z"), "data": data}
    count = 0
    for webhook in session.scalars(select(Webhook).where(Webhook.deleted_at.is_(None))):
        if event_type in webhook.events:
            session.add(WebhookDelivery(webhook_id=webhook.id, message_id=f"msg_{uuid.uuid4().hex}",
                                        event_type=event_type, payload=payload, next_attempt_at=at, created_at=at))
            count += 1
    return count


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
        return True
    except ValueError:
        return False
