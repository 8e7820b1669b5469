"""The schema comes only from Alembic: the migrations build exactly the models' tables, and step down cleanly."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from service.certificates import models as _certificates  # noqa: F401  (every table registered)
from service.webhooks import models as _webhooks  # noqa: F401
from service.consumers import models as _consumers  # noqa: F401
from service.dashboard import models as _dashboard  # noqa: F401
from service.db import Base, alembic_config, engine_for, make_engine, upgrade_schema
from service.deletion_requests import models as _requests  # noqa: F401
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
