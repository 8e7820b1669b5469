"""The schema comes only from Alembic: the migrations build exactly the models' tables, and step down cleanly."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from service.certificates import models as _certificates  # noqa: F401  (every table registered)
from service.webhooks import models as _webhooks  # noqa: F401
from service.consumers import models as _consumers  # noqa: F401
from service.dashboard import models as _dashboard  # noqa: F401
from service.db import Base, alembic_config, engine_for, make_engine, session_scope, upgrade_schema
from service.deletion_requests import models as _requests, run_durations  # noqa: F401
from tests.service_fixtures import Backend


def differences(url: str) -> list:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return compare_metadata(MigrationContext.configure(connection, opts={"render_as_batch": True}),
                                    Base.metadata)
    finally:
        engine.dispose()


def test_the_migrated_schema_matches_the_models(backend: Backend):
    assert differences(backend.settings.database) == []


def test_migrations_step_down_to_nothing_and_up_again(tmp_path):
    url = f"sqlite:///{tmp_path / 'lethe.db'}"
    upgrade_schema(url)
    command.downgrade(alembic_config(url), "0001")
    assert "dashboard_sessions" not in inspect(engine_for(url)).get_table_names()
    command.downgrade(alembic_config(url), "base")
    assert inspect(engine_for(url)).get_table_names() == ["alembic_version"]
    upgrade_schema(url)
    assert differences(url) == []
    engine_for(url).dispose()


def test_the_run_duration_counters_start_from_the_runs_already_recorded(tmp_path):
    """0014 counts each finished request's last run, as /metrics reported them before the counters."""
    url = f"sqlite:///{tmp_path / 'lethe.db'}"
    upgrade_schema(url, "0013")
    started = datetime(2026, 11, 1, tzinfo=timezone.utc)
    runs = {"completed": 90, "propagated": 7000, "failed": 20, "canceled": 5}  # a canceled run has no outcome
    with engine_for(url).begin() as connection:
        connection.execute(text("INSERT INTO registered_models (id, name, created_at, run_lease_token) "
                                "VALUES ('m', 'digits', :at, 0)"), {"at": started})
        for status, seconds in runs.items():
            connection.execute(text(
                "INSERT INTO deletion_requests (id, external_id, model_id, forget_class, forget_uri, status, "
                "received_at, due_at, at_risk_from, created_at, updated_at, started_at, finished_at, extended_days, "
                "body_sha256, seed, attempts, cancel_requested, run_alone, row_version) VALUES (:id, :id, 'm', '1', "
                "'file:///x', :status, :at, :at, :at, :at, :at, :at, :end, 0, '', 0, 1, 0, 0, 1)"),
                {"id": status, "status": status, "at": started, "end": started + timedelta(seconds=seconds)})
    upgrade_schema(url)
    with session_scope(url) as session:
        durations = run_durations.read(session)
    assert (durations.count, durations.total_seconds) == (3, 7110)
    assert dict(durations.cumulative)[30] == 1 and dict(durations.cumulative)[120] == 2
    engine_for(url).dispose()
