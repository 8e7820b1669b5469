"""The worker's Celery application, built from settings, and its logging (the queue's names and the
wake-up message live in ``service.queue``: the API sends them without importing this).

A message carries the id of the API request that enqueued it (a header), and the worker sets it
for the task's log lines: an erasure can be followed from its HTTP request to the run that served it.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from functools import lru_cache

from celery import Celery, signals

from service.config import Settings, get_settings
from service.logs import configure_logging, request_id_var, sane_request_id
from service.queue import DELIVER_TASK, QUEUE, REQUEST_ID_HEADER, SWEEP_QUEUE, SWEEP_TASK


def make_celery(settings: Settings) -> Celery:
    app = Celery("lethe", broker=settings.broker, include=["worker.tasks"])
    app.conf.update(
        task_default_queue=QUEUE,
        task_ignore_result=True,
        # The database is the source of truth for what must run (leases + the sweep), so a
        # message is only a wake-up call: late acks, one at a time.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        task_routes={SWEEP_TASK: {"queue": SWEEP_QUEUE}, DELIVER_TASK: {"queue": SWEEP_QUEUE}},
        beat_schedule={"sweep": {"task": SWEEP_TASK, "schedule": settings.sweep_seconds,
                                 "options": {"queue": SWEEP_QUEUE, "expires": settings.sweep_seconds}},
                       # the webhook outbox's relay: due deliveries every few seconds
                       "webhooks": {"task": DELIVER_TASK, "schedule": settings.webhook_poll_seconds,
                                    "options": {"queue": SWEEP_QUEUE, "expires": settings.webhook_poll_seconds}}},
        timezone="UTC",
    )
    return app


def declare_queue(app: Celery, attempts: int = 5) -> None:
    """Create the queue before the worker starts. On the embedded SQL transport the queue is a table
    row that kombu creates on first use without a lock: two workers starting at once race on it and
    the loser dies with an IntegrityError (messages it had fetched would then be lost to the broker,
    though not to the database and the sweep). Declaring it here, retried, settles the race."""
    from kombu import Queue

    try:
        for attempt in range(attempts):
            try:
                with app.connection_for_write() as connection:
                    for name in (QUEUE, SWEEP_QUEUE):
                        Queue(name)(connection.default_channel).declare()
                return
            except Exception:  # the other worker created it meanwhile (or the broker is still starting)
                if attempt == attempts - 1:
                    raise
                time.sleep(0.2 * (attempt + 1))
    finally:
        _forget_sql_transport_engines()


def _forget_sql_transport_engines() -> None:
    """kombu's SQL transport caches its engine (and pooled connections) on the Channel class. The
    worker forks its pool and its beat after this process declared the queue: a child that inherits
    the parent's SQLite connections breaks them ("channel disconnected", wake-ups never consumed).
    Each process must open its own, so the parent drops its cache before the fork."""
    from kombu.transport import sqlalchemy as sql_transport

    engines = sql_transport.Channel._engines
    for engine, _ in list(engines.values()):
        engine.dispose()
    engines.clear()


@lru_cache
def celery_for(broker: str) -> Celery:
    settings = get_settings() if get_settings().broker == broker else Settings(broker_url=broker)
    return make_celery(settings)


@signals.setup_logging.connect
def _configure_worker_logging(loglevel=None, **_) -> None:
    """Celery leaves logging alone when this signal has a receiver: ours, in text or JSON."""
    configure_logging(get_settings(), level=loglevel or None)


@signals.task_prerun.connect
def _enter_request_context(task=None, **_) -> None:
    # A task without the header (the beat's sweep) gets an id of its own: its wake-ups carry it on.
    request_id_var.set(sane_request_id(task.request.get(REQUEST_ID_HEADER) if task is not None else None))


@signals.task_postrun.connect
def _leave_request_context(**_) -> None:
    request_id_var.set(None)


@signals.worker_ready.connect
def _remove_stale_run_folders(**_) -> None:
    """A worker restarted after a kill removes the run folders (personal data) its dead processes left."""
    from worker.run_folders import remove_stale_run_folders_safely

    remove_stale_run_folders_safely()


def prune_delivered_messages(broker: str, older_than_seconds: float = 3600.0) -> int:
    """Delete the messages the embedded broker has delivered, older than an hour; returns how many.

    kombu's SQL transport keeps every delivered message (``visible`` false) for ever: with the
    sweep every 30 s and the webhook relay every 2 s, the embedded broker's file would grow by
    tens of thousands of rows a day. Redis needs nothing of the kind."""
    if not broker.startswith("sqla+"):
        return 0
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    engine = create_engine(broker.removeprefix("sqla+"))
    cutoff = datetime.now() - timedelta(seconds=older_than_seconds)  # kombu stamps local, naive times
    try:
        with engine.begin() as connection:
            return connection.execute(text("DELETE FROM kombu_message WHERE visible = :delivered AND timestamp < :cutoff"),
                                      {"delivered": False, "cutoff": cutoff}).rowcount
    except OperationalError:  # no message table yet: nothing was ever sent
        return 0
    finally:
        engine.dispose()
