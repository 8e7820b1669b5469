"""The audit trail is a hash chain per request: intact as written, and an event edited or removed
directly in the database (Postgres and SQLite alike) is found and named by ``lethe audit verify``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy import text

from service.cli import main
from service.config import get_settings
from service.db import engine_for, session_scope
from service.deletion_requests.audit_chain import head, verify
from service.deletion_requests.models import AuditEvent
from tests.service_fixtures import register_digits, request_body

REPO = Path(__file__).resolve().parents[3]


def a_request_with_a_trail(client, admin, digits, digits_model) -> str:
    assert register_digits(client, admin, digits_model).status_code == 201
    request_id = client.post("/deletion-requests", headers=admin, json=request_body(digits)).json()["id"]
    assert client.post(f"/deletion-requests/{request_id}/extend", headers=admin,
                       json={"days": 10, "reason": "complex request"}).status_code == 200
    assert client.post(f"/deletion-requests/{request_id}/cancel", headers=admin, json={}).status_code == 200
    return request_id


def audit_verify(backend) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", "audit", "verify"], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, **backend.env}, timeout=120)


def test_each_event_links_to_the_one_before_and_the_trail_verifies(backend, client, admin, digits, digits_model):
    request_id = a_request_with_a_trail(client, admin, digits, digits_model)
    with session_scope(backend.settings.database) as session:
        events = session.query(AuditEvent).filter_by(request_id=request_id).order_by(AuditEvent.id).all()
        assert len(events) >= 4 and events[0].prev_sha256 is None
        assert [e.prev_sha256 for e in events[1:]] == [e.sha256 for e in events[:-1]]
        assert head(session, request_id) == events[-1].sha256
        assert verify(session) == (1, len(events), [])
    done = audit_verify(backend)
    assert done.returncode == 0 and done.stderr.strip() == f"1 chain(s), {len(events)} event(s): intact"


def audit_verify_in_process(backend, monkeypatch, capsys) -> tuple[int, str]:
    """``lethe audit verify`` in this process (the installed command has its own test above)."""
    for name, value in backend.env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        code = main(["audit", "verify"])
    finally:
        get_settings.cache_clear()
    return code, capsys.readouterr().out


def test_an_event_edited_or_removed_in_the_database_is_found(backend, client, admin, digits, digits_model,
                                                             monkeypatch, capsys):
    request_id = a_request_with_a_trail(client, admin, digits, digits_model)
    with engine_for(backend.settings.database).begin() as connection:
        ids = connection.execute(text("SELECT id FROM audit_events WHERE request_id = :r ORDER BY id"),
                                 {"r": request_id}).scalars().all()
        connection.execute(text("UPDATE audit_events SET actor = 'someone-else' WHERE id = :i"), {"i": ids[1]})
    code, out = audit_verify_in_process(backend, monkeypatch, capsys)
    assert code == 1
    assert f"broken: request {request_id}, event {ids[1]}: its fields were changed after it was written" in out

    with engine_for(backend.settings.database).begin() as connection:
        connection.execute(text("DELETE FROM audit_events WHERE id = :i"), {"i": ids[1]})
    code, out = audit_verify_in_process(backend, monkeypatch, capsys)
    assert code == 1
    assert f"broken: request {request_id}, event {ids[2]}: does not follow the event before it" in out
