"""Alembic environment: the URL comes from the caller (``lethe db upgrade``) or LETHE_DATABASE_URL."""

from alembic import context
from sqlalchemy import pool

from service.auth import models as _auth  # noqa: F401  (registers the tables)
from service.config import get_settings
from service.db import Base, make_engine
from service.certificates import models as _certificates  # noqa: F401
from service.dashboard import models as _dashboard  # noqa: F401
from service.deletion_requests import models as _requests  # noqa: F401
from service.registry import models as _registry  # noqa: F401
from service.webhooks import models as _webhooks  # noqa: F401
from service.consumers import models as _consumers  # noqa: F401

config = context.config
url = config.get_main_option("sqlalchemy.url") or get_settings().database


def run_migrations_offline() -> None:
    context.configure(url=url, target_metadata=Base.metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(url)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
