"""The relay: sends due deliveries, signed by the Standard Webhooks library (``standardwebhooks``,
the spec's own implementation: ``webhook-id``, ``webhook-timestamp`` and ``webhook-signature`` =
v1,base64(HMAC-SHA256(secret, id.timestamp.body))).

A delivery is claimed before it is sent (its next attempt moved past the send's time limit, in a
transaction of its own), so no database lock is held over the network and a relay that dies
mid-send only delays it: at least once, and receivers de-duplicate by ``webhook-id``. Redirects are
not followed; every attempt re-checks the target (targets.py) and connects to the address checked.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from sqlalchemy import select
from standardwebhooks.webhooks import Webhook as Signer

from service.config import Settings
from service.db import db_now, session_scope
from service.errors import ServiceError
from service.webhooks.models import Webhook, WebhookDelivery
from service.webhooks.targets import Target, check_target

log = logging.getLogger("lethe.webhooks")
LONGEST_RETRY_SECONDS = 3600.0


@dataclass(frozen=True)
class Claimed:
    id: int
    url: str
    secret: str
    message_id: str
    payload: dict[str, Any]
    created_at: datetime
    attempts: int


def deliver_due(settings: Settings, limit: int = 50) -> dict[str, int]:
    """Send every due delivery (at most ``limit``); counts of delivered, retrying and failed."""
    counts = {"delivered": 0, "retrying": 0, "failed": 0}
    for claimed in claim(settings, limit):
        outcome = send(settings, claimed)
        counts[settle(settings, claimed, *outcome)] += 1
    return counts


def claim(settings: Settings, limit: int) -> list[Claimed]:
    with session_scope(settings.database) as session:
        now = db_now(session)
        rows = session.execute(select(WebhookDelivery, Webhook).join(Webhook, Webhook.id == WebhookDelivery.webhook_id)
                               .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now)
                               .order_by(WebhookDelivery.next_attempt_at).limit(limit)
                               .with_for_update(skip_locked=True, of=WebhookDelivery)).all()
        claimed = []
        for delivery, webhook in rows:
            delivery.attempts += 1
            delivery.next_attempt_at = now + timedelta(seconds=settings.webhook_timeout_seconds + 60)
            claimed.append(Claimed(delivery.id, webhook.url, webhook.secret, delivery.message_id, delivery.payload,
                                   delivery.created_at, delivery.attempts))
        return claimed


def send(settings: Settings, claimed: Claimed) -> tuple[int | None, str | None, int | None, bool]:
    """(status code, error, latency ms, refused for good) of one attempt."""
    try:
        target = check_target(claimed.url, settings.webhook_hosts)
    except ServiceError as exc:
        return None, exc.detail, None, True
    body = json.dumps(claimed.payload, separators=(",", ":"), ensure_ascii=False)
    sent_at = datetime.now().astimezone()
    headers = {"content-type": "application/json", "user-agent": "lethe-webhooks",
               "webhook-id": claimed.message_id, "webhook-timestamp": str(int(sent_at.timestamp())),
               "webhook-signature": Signer(claimed.secret).sign(claimed.message_id, sent_at, body)}
    started = time.perf_counter()
    try:
        with httpx.Client(timeout=settings.webhook_timeout_seconds, follow_redirects=False, trust_env=False) as client:
            response = client.post(_pinned(target), content=body.encode(), headers={**headers, "host": _host_header(target)},
                                   extensions={"sni_hostname": target.host} if target.scheme == "https" else {})
        latency = int((time.perf_counter() - started) * 1000)
        error = None if response.is_success else f"answered {response.status_code}"
        return response.status_code, error, latency, False
    except httpx.HTTPError as exc:
        return None, f"{type(exc).__name__}: {exc}"[:500], int((time.perf_counter() - started) * 1000), False


def settle(settings: Settings, claimed: Claimed, code: int | None, error: str | None, latency: int | None,
           refused: bool) -> str:
    with session_scope(settings.database) as session:
        delivery = session.get(WebhookDelivery, claimed.id)
        now = db_now(session)
        delivery.last_status_code, delivery.last_error, delivery.last_latency_ms = code, error, latency
        if delivery.status != "pending":  # the webhook was deleted meanwhile
            return "failed"
        if error is None:
            delivery.status, delivery.delivered_at = "delivered", now
            return "delivered"
        if refused or now - claimed.created_at >= timedelta(hours=settings.webhook_retry_hours):
            delivery.status = "failed"
            log.warning("webhook delivery %s failed for good after %d attempt(s): %s", claimed.message_id,
                        claimed.attempts, error)
            return "failed"
        wait = backoff(claimed.attempts, settings.webhook_first_retry_seconds)
        delivery.next_attempt_at = now + timedelta(seconds=wait)
        return "retrying"


def backoff(attempts: int, first: float) -> float:
    """Seconds before the next attempt: ``first`` (LETHE_WEBHOOK_FIRST_RETRY_SECONDS, 5 s) doubling per
    attempt up to an hour, times a jitter of 0.5-1.5 so that many deliveries failing together do not
    retry together."""
    return min(first * 2 ** (attempts - 1), LONGEST_RETRY_SECONDS) * random.uniform(0.5, 1.5)


def _pinned(target: Target) -> str:
    """The URL with its host replaced by the address that was checked."""
    parts = urlsplit(target.url)
    address = f"[{target.address}]" if ":" in target.address else target.address
    return urlunsplit((parts.scheme, f"{address}:{target.port}", parts.path or "/", parts.query, ""))


def _host_header(target: Target) -> str:
    default = 443 if target.scheme == "https" else 80
    return target.host if target.port == default else f"{target.host}:{target.port}"
