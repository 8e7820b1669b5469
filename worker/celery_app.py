"""The Celery application, built from settings; and the one function that enqueues work."""

from __future__ import annotations

from functools import lru_cache

from celery import Celery

from service.config import Settings, get_settings

QUEUE = "lethe"
PROCESS_TASK = "lethe.process_request"
SWEEP_TASK = "lethe.sweep"


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
        beat_schedule={"sweep": {"task": SWEEP_TASK, "schedule": settings.sweep_seconds}},
        timezone="UTC",
    )
    return app


@lru_cache
def celery_for(broker: str) -> Celery:
    settings = get_settings() if get_settings().broker == broker else Settings(broker_url=broker)
    return make_celery(settings)


def enqueue_request(settings: Settings, request_id: str) -> None:
    """Wake a worker for this request. Called only after the request's transaction committed."""
    if settings.broker.startswith("sqla+sqlite:///"):
        settings.home.mkdir(parents=True, exist_ok=True)
    celery_for(settings.broker).send_task(PROCESS_TASK, args=[request_id], queue=QUEUE)
