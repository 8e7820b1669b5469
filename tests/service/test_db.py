"""Sessions: a read-only one (every HTTP GET) takes no write lock on SQLite and refuses to write."""

from __future__ import annotations

import sqlite3
import time

import pytest

from service.auth.models import ApiKey
from service.db import read_only_session
from tests.service_fixtures import register_digits, request_body


def test_a_get_is_answered_while_another_process_holds_the_embedded_write_lock(backend, client, admin, digits,
                                                                                digits_model):
    if backend.name != "embedded":
        pytest.skip("SQLite's write lock; Postgres readers never wait for writers")
    assert register_digits(client, admin, digits_model).status_code == 201
    created = client.post("/deletion-requests", headers=admin, json=request_body(digits)).json()["id"]
    writer = sqlite3.connect(backend.settings.database.removeprefix("sqlite:///"), isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # as a worker publishing a version would
    try:
        started = time.monotonic()
        response = client.get(f"/deletion-requests/{created}", headers=admin)
        waited = time.monotonic() - started
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert response.status_code == 200
    assert waited < 5  # before: it queued for the lock (30 s busy timeout), then answered 500


def test_a_read_only_session_refuses_to_write(backend, admin):
    session = read_only_session(backend.settings.database)
    try:
        key = session.query(ApiKey).first()
        key.name = "renamed"
        with pytest.raises(RuntimeError, match="read-only"):
            session.flush()
    finally:
        session.rollback()
        session.close()
