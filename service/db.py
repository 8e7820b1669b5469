"""Database engine, sessions and the declarative base. The schema itself comes only from Alembic."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from functools import lru_cache

from sqlalchemy import DateTime, Engine, MetaData, create_engine, event, text
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.types import TypeDecorator

NAMING = {"ix": "ix_%(column_0_label)s", "uq": "uq_%(table_name)s_%(column_0_name)s",
          "ck": "ck_%(table_name)s_%(constraint_name)s", "fk": "fk_%(table_name)s_%(column_0_name)s",
          "pk": "pk_%(table_name)s"}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the offset otherwise)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime; use utcnow()")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def on_commit(session: Session, callback) -> None:
    """Run ``callback()`` once the session's transaction has committed (never if it rolls back)."""
    session.info.setdefault("on_commit", []).append(callback)


@event.listens_for(Session, "after_commit")
def _run_on_commit(session: Session) -> None:
    callbacks, session.info["on_commit"] = session.info.get("on_commit", []), []
    for callback in callbacks:
        callback()


@event.listens_for(Session, "after_rollback")
def _drop_on_commit(session: Session) -> None:
    session.info["on_commit"] = []


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def db_now(session: Session) -> datetime:
    """The database's clock, for leases: every host judges a lease by the same clock, not its own.
    (The embedded SQLite database lives on the one host that uses it.)"""
    if session.get_bind().dialect.name == "postgresql":
        return session.execute(text("SELECT clock_timestamp()")).scalar_one()
    return utcnow()


# A process's connections: this many are kept open; more are opened when needed and closed after,
# never waited for. What bounds them is their users: the API admits LETHE_API_DB_CONCURRENCY calls at
# a time (service.admission), a worker runs one task per process. A pool that made callers wait
# could deadlock FastAPI's thread pool (see service.admission).
POOL_SIZE = 10
READ_ONLY = "lethe_read_only"  # execution option: a read-only transaction (SQLite: no write lock)


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                               pool_size=POOL_SIZE, max_overflow=-1)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record) -> None:
            dbapi_connection.isolation_level = None  # let the "begin" hook below start transactions
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")  # readers do not block the worker's writes
            cursor.execute("PRAGMA busy_timeout=30000")
            # Deleted and overwritten content is zeroed, not left in free pages: a redacted name must
            # not survive in the file (service/redaction.py also checkpoints the WAL after redacting).
            cursor.execute("PRAGMA secure_delete=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _begin(connection) -> None:
            # A writer takes the write lock up front: a deferred transaction that read first would
            # fail with SQLITE_BUSY instead of waiting when another writer committed meanwhile. A
            # reader takes none (WAL: it reads a snapshot), so reads never queue behind writes.
            read_only = connection.get_execution_options().get(READ_ONLY, False)
            connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

        return engine
    connect_args = {"connect_timeout": 5} if url.startswith("postgresql") else {}
    return create_engine(url, pool_pre_ping=True, pool_size=POOL_SIZE, max_overflow=-1, connect_args=connect_args)


@lru_cache
def engine_for(url: str) -> Engine:
    return make_engine(url)


def session_factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(bind=engine_for(url), expire_on_commit=False)


def read_only_session(url: str) -> Session:
    """A session for a call that only reads (an HTTP GET): on SQLite it takes no write lock. It
    refuses to flush a change, so a read path that starts writing fails in the tests, not later
    under load (where a write upgraded from a stale read snapshot fails with SQLITE_BUSY)."""
    session = Session(bind=engine_for(url).execution_options(**{READ_ONLY: True}), expire_on_commit=False)
    session.info[READ_ONLY] = True
    return session


@event.listens_for(Session, "before_flush")
def _refuse_writes_when_read_only(session: Session, _context, _instances) -> None:
    if session.info.get(READ_ONLY) and (session.new or session.dirty or session.deleted):
        raise RuntimeError("a read-only session (an HTTP GET) tried to write")


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on error. Service functions only flush."""
    session = session_factory(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(url: str):
    from pathlib import Path

    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).resolve().parents[1] / "migrations"))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade_schema(url: str, revision: str = "head") -> None:
    """Create or migrate the schema (``lethe db upgrade``)."""
    from alembic import command

    if url.startswith("sqlite:///"):
        from pathlib import Path

        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(url), revision)
