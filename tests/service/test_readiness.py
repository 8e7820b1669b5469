"""GET /readyz: 200 when the database, the broker and the artifact store answer; 503 naming the failed check, quickly."""

from __future__ import annotations

import os
import socket
import time

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from service.registry.storage import artifact_store


def readiness(settings: Settings):
    with TestClient(create_app(settings, enqueue=lambda _id: None)) as client:
        return client.get("/readyz")


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_ready_when_database_broker_and_artifacts_answer(client):
    response = client.get("/readyz")
    assert response.status_code == 200, response.json()
    assert response.json() == {"status": "ready", "checks": {"database": "ok", "broker": "ok", "artifacts": "ok"}}


def test_a_broker_on_a_closed_port_makes_the_service_not_ready(backend):
    settings = backend.settings.model_copy(update={"broker_url": f"redis://127.0.0.1:{closed_port()}/0"})
    response = readiness(settings)
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["broker"].startswith("error") and checks["database"] == "ok" and checks["artifacts"] == "ok"


def test_a_broker_that_never_answers_is_reported_within_seconds(backend):
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        settings = backend.settings.model_copy(update={"broker_url": f"redis://127.0.0.1:{silent.getsockname()[1]}/0"})
        started = time.monotonic()
        response = readiness(settings)
        elapsed = time.monotonic() - started
    assert response.status_code == 503 and response.json()["checks"]["broker"].startswith("error")
    assert elapsed < 8


def test_an_unusable_embedded_queue_makes_the_service_not_ready(backend, tmp_path):
    settings = backend.settings.model_copy(update={"broker_url": f"sqla+sqlite:///{tmp_path}/missing/broker.db"})
    response = readiness(settings)
    assert response.status_code == 503 and response.json()["checks"]["broker"].startswith("error")


def test_an_artifacts_folder_that_cannot_be_created_makes_the_service_not_ready(backend, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    settings = backend.settings.model_copy(update={"artifacts_uri": str(blocker / "artifacts")})
    response = readiness(settings)
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["artifacts"].startswith("error") and checks["database"] == "ok"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_artifacts_folder_without_write_permission_makes_the_service_not_ready(backend, tmp_path):
    folder = tmp_path / "artifacts"
    folder.mkdir(mode=0o555)
    settings = backend.settings.model_copy(update={"artifacts_uri": str(folder)})
    assert readiness(settings).status_code == 503


def test_the_folder_store_check_creates_the_folder_and_leaves_nothing_behind(tmp_path):
    folder = tmp_path / "new" / "artifacts"
    artifact_store(Settings(home=tmp_path, artifacts_uri=str(folder))).check()
    assert folder.is_dir() and list(folder.iterdir()) == []
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError):
        artifact_store(Settings(home=tmp_path, artifacts_uri=str(tmp_path / "file" / "artifacts"))).check()


def test_liveness_stays_trivial_when_nothing_else_answers(tmp_path):
    settings = Settings(home=tmp_path, database_url="postgresql+psycopg://postgres@127.0.0.1:9/none",
                        broker_url=f"redis://127.0.0.1:{closed_port()}/0")
    with TestClient(create_app(settings, enqueue=lambda _id: None)) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["database"].startswith("error")


def test_an_artifacts_folder_with_less_than_the_minimum_free_space_is_not_ready(backend):
    settings = backend.settings.model_copy(update={"min_free_bytes": 1 << 60})  # more than any disk has
    response = readiness(settings)
    assert response.status_code == 503
    assert response.json()["checks"]["artifacts"].startswith("error: storage almost full")
