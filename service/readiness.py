"""Readiness checks: the database, the broker and the artifact store, each bounded by a short timeout."""

from __future__ import annotations

import errno
from collections.abc import Callable
from functools import lru_cache
from concurrent.futures import ThreadPoolExecutor, wait

from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from service.db import engine_for

CHECK_TIMEOUT = 3.0  # seconds for all checks together: a probe must answer before its own timeout


def check_database(url: str) -> None:
    """The database answers and its schema is the one this code needs: on an empty or old one every
    call would fail (503), so the service is not ready."""
    from sqlalchemy.exc import DBAPIError

    with engine_for(url).connect() as connection:
        try:
            found = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
        except DBAPIError as exc:
            if "alembic_version" not in str(exc):  # not a missing table: down, locked, not a database
                raise
            found = None
    if found != head_revision():
        raise OSError(errno.EPROTO, f"schema at {found or 'none'}, not {head_revision()}: run lethe db upgrade")


@lru_cache(maxsize=1)
def head_revision() -> str:
    from alembic.script import ScriptDirectory

    from service.db import alembic_config

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def check_broker(url: str, timeout: float = 2.0) -> None:
    """Redis answers PING; the embedded SQLAlchemy transport's database answers a query."""
    if url.startswith(("redis://", "rediss://", "unix://")):
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        try:
            client.ping()
        finally:
            client.close()
    elif url.startswith("sqla+"):
        engine = create_engine(url.removeprefix("sqla+"), poolclass=NullPool)
        try:
            with engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        finally:
            engine.dispose()
    else:  # another kombu transport: let kombu connect, once
        from kombu import Connection

        with Connection(url, connect_timeout=timeout) as connection:
            connection.ensure_connection(max_retries=1, timeout=timeout)


def run_checks(checks: dict[str, Callable[[], None]], timeout: float = CHECK_TIMEOUT) -> dict[str, str]:
    """Each check's outcome: "ok", "error: <kind>" or "error: timed out". Never waits past ``timeout``.

    Errors name their kind, never their message: a driver's message can carry a URL with a password.
    """
    pool = ThreadPoolExecutor(max_workers=len(checks), thread_name_prefix="lethe-ready")
    futures = {name: pool.submit(check) for name, check in checks.items()}
    wait(futures.values(), timeout=timeout)
    pool.shutdown(wait=False, cancel_futures=True)  # a hung check finishes (or not) on its own
    results = {}
    for name, future in futures.items():
        if not future.done():
            results[name] = "error: timed out"
        elif future.exception() is not None:
            exc = future.exception()
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            results[name] = f"error: {reason}"
        else:
            results[name] = "ok"
    return results
