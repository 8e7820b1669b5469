"""Celery tasks, kept thin: ids cross the queue, the database says what to do (see worker.runs.pipeline)."""

from __future__ import annotations

import logging
import os
import socket

from celery import shared_task

from service.config import get_settings
from service.db import session_scope
from service.deletion_requests.models import DeletionRequest, RequestStatus
from worker.celery_app import prune_delivered_messages
from worker.runs.pipeline import process_model
from worker.runs.sweep import sweep as sweep_once
from service.queue import DELIVER_TASK, PROCESS_TASK, SWEEP_TASK, send_wakeup
from service.webhooks.delivery import deliver_due

log = logging.getLogger("lethe.worker")


@shared_task(name=PROCESS_TASK)
def process_request(request_id: str) -> None:
    """Wake-up for one request: serve its model's whole queue if no other worker is on it.

    Idempotent: a redelivered or stale message finds nothing queued and returns.
    """
    settings = get_settings()
    with session_scope(settings.database) as session:
        request = session.get(DeletionRequest, request_id)
        if request is None or request.status != RequestStatus.QUEUED:
            return
        model_id = request.model_id
    worker_id = f"{socket.gethostname()}:{os.getpid()}"
    waiting = process_model(settings, model_id, worker_id)
    log.info("request %s: one run of model %s by %s; %s", request_id, model_id, worker_id,
             "more queued" if waiting else "its queue is empty",
             extra={"deletion_request": request_id, "model_id": model_id, "worker": worker_id})
    if waiting is not None:  # to the back of the queue: other models' wake-ups come first
        send_wakeup(settings, waiting)


@shared_task(name=SWEEP_TASK)
def sweep() -> dict:
    """Periodic: recover requests of dead workers, wake idle queues, flag deadlines, dispose of old weights."""
    settings = get_settings()
    counts = sweep_once(settings, lambda request_id: send_wakeup(settings, request_id))
    counts["broker_messages_pruned"] = prune_delivered_messages(settings.broker)
    log.info("sweep: %s", counts)
    return counts


@shared_task(name=DELIVER_TASK)
def deliver_webhooks() -> dict:
    """Periodic: send the webhook deliveries that are due (the outbox's relay)."""
    counts = deliver_due(get_settings())
    if any(counts.values()):
        log.info("webhooks: %s", counts)
    return counts
