"""The embedded broker (kombu's SQL transport on SQLite) keeps delivered messages: the sweep's
housekeeping deletes those older than an hour and leaves every message still to deliver."""

from __future__ import annotations

from datetime import datetime, timedelta

from kombu import Connection
from sqlalchemy import create_engine, text

from worker.celery_app import prune_delivered_messages


def test_delivered_messages_older_than_an_hour_are_deleted_and_pending_ones_kept(tmp_path):
    broker = f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    with Connection(broker) as connection:
        queue = connection.SimpleQueue("lethe-test")
        for body in ("delivered", "pending"):
            queue.put(body)
        queue.get(timeout=5).ack()
        queue.close()
    engine = create_engine(broker.removeprefix("sqla+"))
    with engine.begin() as db:
        db.execute(text("UPDATE kombu_message SET timestamp = :old"), {"old": datetime.now() - timedelta(hours=2)})
    assert prune_delivered_messages(broker) == 1
    with engine.begin() as db:
        assert db.execute(text("SELECT visible FROM kombu_message")).scalars().all() == [True]
    engine.dispose()
    assert prune_delivered_messages(broker) == 0  # nothing more to delete
    assert prune_delivered_messages(f"sqla+sqlite:///{tmp_path / 'never-used.db'}") == 0
    assert prune_delivered_messages("redis://127.0.0.1:6379/0") == 0
