"""Waking workers: the queue's names and the one function that sends a wake-up, by task name.

The API never imports the worker: a message only says "look at this request's model"; the database
says what runs. That is also why a broker outage after a commit is not an error for the caller: the
queued status is written in the request's own transaction, and the sweep wakes every model with
queued requests each ``LETHE_SWEEP_SECONDS``. That queued row is the outbox and the sweep its relay,
so an outbox table of its own would hold the same fact twice. A failed wake-up is logged and counted
(``lethe_enqueue_failures_total``); ``/readyz`` reports the broker down meanwhile.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import lru_cache

from celery import Celery

from service.config import Settings
from service.logs import current_request_id

QUEUE = "lethe"
# The sweep has a queue (and a process, ``lethe sweeper``) of its own: behind a run of minutes on the
# runs' queue, expired leases and deadlines would wait as long.
SWEEP_QUEUE = "lethe-sweep"
PROCESS_TASK = "lethe.process_request"
SWEEP_TASK = "lethe.sweep"
DELIVER_TASK = "lethe.deliver_webhooks"  # on the sweep's queue: seconds of network, never behind a run
REQUEST_ID_HEADER = "lethe_request_id"  # the API request's id, carried to the run's log lines

log = logging.getLogger("lethe.api")


@lru_cache
def producer_for(broker: str) -> Celery:
    """A Celery app that only sends (no tasks of its own)."""
    return Celery("lethe", broker=broker, set_as_current=False)


def send_wakeup(settings: Settings, request_id: str) -> None:
    """Ask a worker to serve this request's model; raises when the broker cannot take the message."""
    if settings.broker.startswith("sqla+sqlite:///"):
        settings.home.mkdir(parents=True, exist_ok=True)
    headers = {REQUEST_ID_HEADER: current_request_id()} if current_request_id() else None
    producer_for(settings.broker).send_task(PROCESS_TASK, args=[request_id], queue=QUEUE, headers=headers)


def after_commit_wakeup(send: Callable[[str], None], on_failure: Callable[[], None]) -> Callable[[str], None]:
    """``send`` for use once a transaction has committed: the request is already safe, so a broker
    error is logged and counted and never reaches the caller, who was right to be told 202."""

    def wake(request_id: str) -> None:
        try:
            send(request_id)
        except Exception as exc:  # noqa: BLE001 - any broker failure; the sweep wakes the request later
            on_failure()
            log.warning("could not wake a worker for deletion request %s (%s: %s); it stays queued and the "
                        "sweep wakes it", request_id, type(exc).__name__, exc,
                        extra={"deletion_request": request_id, "broker_error": type(exc).__name__})

    return wake
