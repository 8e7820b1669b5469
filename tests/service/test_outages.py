"""A backend that is down, full or busy is a 503 problem naming it, with Retry-After; never a 500.

The database is made unreachable for real (a closed port, a path that cannot be opened); only the
disk-full case injects its error (ENOSPC), since a test cannot fill the machine's disk.
"""

from __future__ import annotations

import errno
import socket

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from service.errors import ArtifactError
from tests.service_fixtures import register_digits

BEARER = {"Authorization": "Bearer lethe_not-checked-the-database-is-down"}


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def assert_unavailable(response, code: str) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["code"] == code
    assert int(response.headers["Retry-After"]) > 0


@pytest.mark.parametrize("call", [("GET", "/deletion-requests/some-id"), ("GET", "/models/current"),
                                  ("POST", "/deletion-requests/some-id/cancel")])
def test_an_unreachable_postgres_is_a_503_database_unavailable(tmp_path, call):
    settings = Settings(home=tmp_path, database_url=f"postgresql+psycopg://postgres@127.0.0.1:{closed_port()}/lethe")
    with TestClient(create_app(settings, enqueue=lambda _id: None)) as client:
        assert_unavailable(client.request(*call, headers=BEARER), "database_unavailable")


def test_an_embedded_database_that_cannot_be_opened_is_a_503_database_unavailable(tmp_path):
    (tmp_path / "lethe.db").mkdir()  # a folder where the file should be
    with TestClient(create_app(Settings(home=tmp_path), enqueue=lambda _id: None)) as client:
        assert_unavailable(client.get("/deletion-requests", headers=BEARER), "database_unavailable")


def test_a_full_disk_during_an_upload_is_a_503_storage_full_and_registers_nothing(
        backend, client, admin, digits_model, monkeypatch):
    def disk_full(*_args) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("service.registry.views.copy_limited", disk_full)
    assert_unavailable(register_digits(client, admin, digits_model), "storage_full")
    monkeypatch.undo()
    assert client.get("/models/digits/versions", headers=admin).status_code == 404
    assert register_digits(client, admin, digits_model).status_code == 201


def test_an_artifact_store_that_does_not_answer_is_a_503_storage_unavailable(
        backend, client, admin, digits_model, monkeypatch):
    assert register_digits(client, admin, digits_model).status_code == 201

    def store_down(*_args, **_kwargs):
        raise ArtifactError(errno.EIO, "S3 unreachable (EndpointConnectionError)")

    monkeypatch.setattr(client.app.state.store, "local_path", store_down)
    assert_unavailable(client.get("/models/digits/versions/1/weights", headers=admin), "storage_unavailable")


def test_a_file_that_is_not_a_database_is_a_503_database_unavailable(tmp_path):
    (tmp_path / "lethe.db").write_bytes(bytes(range(256)) * 80)  # "file is not a database"
    with TestClient(create_app(Settings(home=tmp_path), enqueue=lambda _id: None)) as client:
        assert_unavailable(client.get("/deletion-requests", headers=BEARER), "database_unavailable")
        assert_unavailable(client.post("/deletion-requests", headers=BEARER, json={}), "database_unavailable")


def test_a_database_without_the_schema_is_a_503_that_says_to_migrate_and_not_ready(tmp_path):
    (tmp_path / "lethe.db").write_bytes(b"")  # an empty SQLite database: no tables
    with TestClient(create_app(Settings(home=tmp_path), enqueue=lambda _id: None)) as client:
        response = client.get("/deletion-requests", headers=BEARER)
        assert_unavailable(response, "database_unavailable")
        assert "lethe db upgrade" in response.json()["detail"]
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "run lethe db upgrade" in ready.json()["checks"]["database"]
