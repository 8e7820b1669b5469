"""Service and worker fixtures (loaded by tests/conftest.py): a fresh database of the tests' own on each backend, the app, API keys, a real worker.

``backend`` runs a test against the embedded default (SQLite + Celery's SQL transport) and against
the real Postgres + Redis on 127.0.0.1. The suite creates (and drops) a Postgres database of its
own, migrated once; every test starts from empty tables, an empty Redis db, a fresh SQLite copy
and a new LETHE_HOME.

``s3`` is a fresh bucket on a real S3 protocol server (moto's, started once per session on a free
port of 127.0.0.1); ``with_s3(backend, s3)`` is a backend whose artifacts live in that bucket and
whose data roots also allow ``s3://bucket/forget-sets``. A test module overrides ``backend`` with
it to run the same fixtures (client, admin, start_worker) against S3.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.auth.service import create_key
from service.config import Settings
from service.db import engine_for, session_scope, upgrade_schema

# Workers for tests about queues, leases and versions rather than the unlearning setting: the
# logit-only setting, whose runs on the digits model stop after a few dozen steps where the head-row
# setting (this model's default: its rows are templates) takes 300.
LOGIT_ONLY = {"LETHE_UNLEARN_TEMPLATE_HEAD_SETTING": "false"}
POSTGRES_ADMIN = os.environ.get("LETHE_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("LETHE_TEST_REDIS", "redis://127.0.0.1:6379")
# Parallel suites on one Redis: give each its own db (LETHE_TEST_REDIS_DB), and each pytest-xdist
# process of a suite the next one (gw0: 13, gw1: 14).
REDIS_TEST_DB = (int(os.environ.get("LETHE_TEST_REDIS_DB", "13"))
                 + int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0))
assert REDIS_TEST_DB <= 15, f"Redis has dbs 0-15; lower LETHE_TEST_REDIS_DB or TEST_PROCESSES (db {REDIS_TEST_DB})"


def postgres_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(POSTGRES_ADMIN.replace("+psycopg", ""), connect_timeout=3):
            return True
    except Exception:
        return False


def redis_available() -> bool:
    try:
        import redis

        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping())
    except Exception:
        return False


@dataclass
class Backend:
    name: str
    env: dict[str, str]
    settings: Settings


def create_postgres_database() -> tuple[str, callable]:
    import psycopg

    name = f"lethe_test_{uuid.uuid4().hex[:12]}"
    admin = POSTGRES_ADMIN.replace("+psycopg", "")
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    url = POSTGRES_ADMIN.rsplit("/", 1)[0] + f"/{name}"

    def drop() -> None:
        engine_for(url).dispose()
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return url, drop


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """One database of the suite's own, migrated once; each test starts from empty tables."""
    if os.environ.get("CI") and not (postgres_available() and redis_available()):
        pytest.fail("Postgres (127.0.0.1:5432) or Redis (127.0.0.1:6379) is not reachable; .ci/run starts them")
    if not (postgres_available() and redis_available()):
        pytest.skip("needs Postgres at 127.0.0.1:5432 and Redis at 127.0.0.1:6379")
    url, drop = create_postgres_database()
    upgrade_schema(url)
    yield url
    drop()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory) -> Path:
    """An embedded database migrated once; each test gets a copy."""
    path = tmp_path_factory.mktemp("sqlite-template") / "lethe.db"
    url = f"sqlite:///{path}"
    upgrade_schema(url)
    engine_for(url).dispose()
    return path


def empty_tables(url: str) -> None:
    from sqlalchemy import text

    from service.db import Base

    tables = ", ".join(table.name for table in Base.metadata.sorted_tables)
    with engine_for(url).begin() as connection:
        connection.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))


@pytest.fixture(params=["embedded", "postgres"])
def backend(request, tmp_path: Path, digits) -> Iterator[Backend]:
    home = tmp_path / "home"
    home.mkdir()
    # A window of fixed length, so that the tests' figures do not depend on today's month (the
    # calendar-month default has tests of its own).
    env = {"LETHE_HOME": str(home), "LETHE_DATA_ROOTS": str(digits.root), "LETHE_LEASE_SECONDS": "6",
           "LETHE_SWEEP_SECONDS": "2", "LETHE_DEADLINE": "P30D"}
    if request.param == "postgres":
        import redis

        env["LETHE_DATABASE_URL"] = request.getfixturevalue("postgres_url")
        empty_tables(env["LETHE_DATABASE_URL"])
        env["LETHE_BROKER_URL"] = f"{REDIS_URL}/{REDIS_TEST_DB}"  # a queue of the suite's own, emptied per test
        redis.Redis.from_url(env["LETHE_BROKER_URL"]).flushdb()
    else:
        shutil.copyfile(request.getfixturevalue("sqlite_template"), home / "lethe.db")
    settings = settings_from(env)
    yield Backend(request.param, env, settings)
    if request.param == "embedded":
        engine_for(settings.database).dispose()


def settings_from(env: dict[str, str]) -> Settings:
    """The settings a process with these ``LETHE_*`` variables reads."""
    return Settings(**{k.removeprefix("LETHE_").lower(): v for k, v in env.items() if k.startswith("LETHE_")})


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """A real S3 protocol server for the session (moto in server mode, in a thread); its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per S3 request in every failure report
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@dataclass
class S3:
    endpoint: str
    bucket: str
    env: dict[str, str]  # the AWS_* variables that reach the server, for worker processes too
    client: object

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def upload_folder(self, folder: Path, prefix: str) -> str:
        """Every file under ``folder`` to ``prefix/<relative path>``; returns ``s3://bucket/prefix``."""
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            self.client.upload_file(str(path), self.bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")
        return self.uri(prefix)

    def keys(self, prefix: str = "") -> list[str]:
        listed = self.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix)
        return sorted(item["Key"] for item in listed.get("Contents", []))


@pytest.fixture
def s3(moto_server: str, monkeypatch) -> S3:
    """A new, empty bucket; this process's AWS_* variables point boto3 at the server (and nowhere else)."""
    from service.registry.storage import s3_client

    env = {"AWS_ENDPOINT_URL": moto_server, "AWS_ACCESS_KEY_ID": "lethe-test", "AWS_SECRET_ACCESS_KEY": "lethe-test",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    client = s3_client()
    bucket = f"lethe-test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    return S3(moto_server, bucket, env, client)


def with_env(backend: Backend, **env: str) -> Backend:
    """The same database and queue, with these ``LETHE_*`` settings added."""
    merged = {**backend.env, **env}
    return Backend(backend.name, merged, settings_from(merged))


def with_s3(backend: Backend, s3: S3) -> Backend:
    """The same database and queue, with artifacts in ``s3://bucket/artifacts`` and ``s3://bucket/forget-sets``
    added to the data roots."""
    env = {**backend.env, **s3.env, "LETHE_ARTIFACTS_URI": s3.uri("artifacts"),
           "LETHE_DATA_ROOTS": f"{backend.env['LETHE_DATA_ROOTS']},{s3.uri('forget-sets')}"}
    return Backend(backend.name, env, settings_from(env))


@pytest.fixture
def enqueued() -> list[str]:
    """Request ids the app enqueued (for API tests that run no worker)."""
    return []


@pytest.fixture
def client(backend: Backend, enqueued: list[str]) -> Iterator[TestClient]:
    with TestClient(create_app(backend.settings, enqueue=enqueued.append)) as test_client:
        yield test_client


def make_key(settings: Settings, *scopes: str) -> dict[str, str]:
    """Authorization headers for a new key with ``scopes``."""
    with session_scope(settings.database) as session:
        _row, key = create_key(session=session, name=f"key-{uuid.uuid4().hex[:8]}", scopes=list(scopes))
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def admin(backend: Backend) -> dict[str, str]:
    return make_key(backend.settings, "admin")


def register_digits(client: TestClient, headers: dict[str, str], package: Path, name: str = "digits",
                    eval_set: str | None = None):
    data = {"name": name, **({"eval_set": eval_set} if eval_set else {})}
    with open(package / "model.json", "rb") as card, open(package / "model.safetensors", "rb") as weights:
        return client.post("/models", headers=headers, data=data, files={"card": card, "weights": weights})


def registered_digits(client: TestClient, headers: dict[str, str], package: Path) -> dict:
    """The digits model registered as version 1; the API's answer."""
    response = register_digits(client, headers, package)
    assert response.status_code == 201, response.text
    return response.json()


def request_body(digits, external_id: str = "subject-1", forget_class: str = "3", model: str = "digits",
                 uri: str | None = None) -> dict:
    return {"external_id": external_id, "model": model, "forget_class": forget_class,
            "forget_set": {"uri": uri or f"file://{digits.train_class(forget_class)}"}}


class WorkerProcess:
    """A real ``lethe worker`` process (with the periodic sweep), killable with SIGKILL."""

    def __init__(self, backend: Backend, log_path: Path, beat: bool = True, env: dict[str, str] | None = None) -> None:
        env = {**os.environ, **backend.env, **(env or {}), "PYTHONUNBUFFERED": "1"}
        command = [sys.executable, "-m", "service.cli", "worker", "--loglevel", "INFO"] + (["--beat"] if beat else [])
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.process = subprocess.Popen(command, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 2 s: the test is over, and a warm shutdown of Celery's SQL
        transport can take 10 s that nothing needs."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()

    def output(self) -> str:
        return self.log_path.read_text()


@pytest.fixture
def start_worker(backend: Backend, tmp_path: Path):
    workers: list[WorkerProcess] = []

    def start(beat: bool = True, **env: str) -> WorkerProcess:
        """A worker; ``env`` adds or overrides variables of its own (its LETHE_HOME, say)."""
        worker = WorkerProcess(backend, tmp_path / f"worker-{len(workers)}.log", beat=beat, env=env)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()


class ApiProcess:
    """A real ``lethe serve`` process on a free port of loopback, with the backend's settings."""

    def __init__(self, backend: Backend, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            env={**os.environ, **backend.env, **(env or {}), "PYTHONUNBUFFERED": "1"},
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        import httpx

        def up() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"lethe serve exited: {self.output()[-2000:]}")
            try:
                return httpx.get(f"{self.base}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, 60, interval=0.2, message="lethe serve to answer /healthz")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self.log.close()

    def output(self) -> str:
        return self.log_path.read_text()


@pytest.fixture
def start_api(backend: Backend, tmp_path: Path):
    apis: list[ApiProcess] = []

    def start(**env: str) -> ApiProcess:
        api = ApiProcess(backend, tmp_path / f"api-{len(apis)}.log", env=env)
        apis.append(api)
        return api

    yield start
    for api in apis:
        api.stop()


def free_port() -> int:
    """A TCP port free on loopback now, for a server a test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, interval: float = 0.5, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {message}")
