"""A class name is often a person's name and a forget set's path often names them: the logs (text
and JSON), the audit trail and the metrics carry request ids, never either; and LETHE_REDACT_AFTER_DAYS
after a request finished, its own row keeps only a salted hash of them (embedded default and Postgres,
a real run)."""

from __future__ import annotations

import io
import json
import logging
import shutil

import pytest
from sqlalchemy import select

from service.certificates.models import Certificate
from service.config import Settings
from service.db import session_scope
from service.deletion_requests.models import AuditEvent, DeletionRequest, RequestStatus as S
from service.deletion_requests.personal_data import commitment, scrub, scrub_detail
from service.logs import JsonFormatter, RequestIdFilter, configure_logging
from service.registry.models import RegisteredModel
from tests.service.deletion_requests.test_audit_chain import audit_verify
from tests.service_fixtures import register_digits, request_body
from worker.runs.pipeline import process_model
from worker.runs.sweep import sweep

PERSON = "zoe-kowalska"


# --- scrubbing ------------------------------------------------------------------------------------

def test_scrub_replaces_references_with_the_files_under_them_and_names_but_not_digits():
    uri = "file:///data/people/zoe-kowalska%20photos"
    text = (f"{uri}: no images; /data/people/zoe-kowalska photos/zk-1.png: unreadable; zoe-kowalska at 3.5%; "
            "/tmp/run-1/sources/x/zoe.png")
    scrubbed = scrub(text, classes=["zoe-kowalska", "3"], uris=[uri], folders=["/tmp/run-1"])
    assert scrubbed == "<forget set>: no images; <forget set>: unreadable; <class> at 3.5%; <forget set>"
    assert scrub("zoe-kowalskaX and xzoe-kowalska", classes=["zoe-kowalska"]) == "zoe-kowalskaX and xzoe-kowalska"


@pytest.mark.parametrize("written", ["bo-lind-99.png", "BO_LIND_99.png", "bo lind.jpg", "photos/Bo.Lind/1.png"])
def test_a_name_is_found_in_any_case_and_separator_inside_file_names(written):
    assert "lind" not in scrub(f"{written}: not a decodable image", classes=["bo-lind"]).lower()


def test_scrub_detail_reaches_keys_and_nested_values():
    detail = {"forget_acc": {PERSON: 3.0}, "reasons": [f"{PERSON} still known"], "n": 3}
    assert scrub_detail(detail, classes=[PERSON]) == {"forget_acc": {"<class>": 3.0}, "reasons": ["<class> still known"],
                                                      "n": 3}


def test_a_commitment_depends_on_the_nonce_the_class_and_the_set():
    base = commitment("n1", PERSON, "file:///a")
    assert base == commitment("n1", PERSON, "file:///a")
    assert len({base, commitment("n2", PERSON, "file:///a"), commitment("n1", "other", "file:///a"),
                commitment("n1", PERSON, "file:///b")}) == 4


# --- a real run --------------------------------------------------------------------------------------

@pytest.fixture
def person_model(digits_model, tmp_path):
    """The digits model with class 3 named after a person."""
    package = tmp_path / "people-model"
    shutil.copytree(digits_model, package)
    card = json.loads((package / "model.json").read_text())
    card["classes"] = [PERSON if c == "3" else c for c in card["classes"]]
    (package / "model.json").write_text(json.dumps(card))
    return package


@pytest.fixture
def person_set(digits, backend):
    """The person's photos, in a folder named after them (inside the data roots)."""
    folder = digits.root / f"people-{backend.name}" / f"{PERSON} photos"
    shutil.rmtree(folder.parent, ignore_errors=True)
    shutil.copytree(digits.train_class("3"), folder)
    yield folder
    shutil.rmtree(folder.parent, ignore_errors=True)


@pytest.fixture
def logs():
    """Every log line of this process while the test runs, in the text and the JSON format."""
    text, structured = io.StringIO(), io.StringIO()
    plain = configure_logging(Settings(log_format="text"), "DEBUG", text)
    as_json = logging.StreamHandler(structured)
    as_json.setFormatter(JsonFormatter())
    as_json.addFilter(RequestIdFilter())
    logging.getLogger().addHandler(as_json)
    yield lambda: text.getvalue() + structured.getvalue()
    for handler in (plain, as_json):
        logging.getLogger().removeHandler(handler)


def run_request(backend, client, admin, person_model, uri) -> str:
    assert register_digits(client, admin, person_model, name="people").status_code == 201
    body = {"external_id": "ticket-1", "model": "people", "forget_class": PERSON, "forget_set": {"uri": uri}}
    request_id = client.post("/deletion-requests", headers=admin, json=body).json()["id"]
    with session_scope(backend.settings.database) as session:
        model_id = session.scalar(select(RegisteredModel.id))
    process_model(backend.settings, model_id, "w1")
    return request_id


def test_no_log_line_event_or_metric_names_the_person_or_their_forget_set(
        backend, client, admin, person_model, person_set, logs):
    uri = f"file://{person_set}"
    request_id = run_request(backend, client, admin, person_model, uri)
    broken = client.post("/deletion-requests", headers=admin, json={
        "external_id": "ticket-2", "model": "people", "forget_class": "5",
        "forget_set": {"uri": f"file://{person_set.parent}/{PERSON} missing"}}).json()["id"]
    client.get(f"/deletion-requests/{request_id}", headers=admin)
    with session_scope(backend.settings.database) as session:
        model_id = session.scalar(select(RegisteredModel.id))
        assert session.get(DeletionRequest, request_id).status == S.PROPAGATED
    process_model(backend.settings, model_id, "w1")  # the second request is rejected: its set is missing
    with session_scope(backend.settings.database) as session:
        assert session.get(DeletionRequest, broken).status == S.REJECTED
        trail = json.dumps([e.detail for e in session.scalars(select(AuditEvent))])
    written = logs()
    assert request_id in written and broken in written  # the lines are there, by request id
    for name in (PERSON, "photos"):
        assert name not in written, [line for line in written.splitlines() if name in line][:3]
        assert name not in trail
    assert PERSON not in client.get("/metrics").text


def test_redaction_leaves_a_salted_hash_the_certificate_holder_can_match(
        backend, client, admin, person_model, person_set):
    uri = f"file://{person_set}"
    request_id = run_request(backend, client, admin, person_model, uri)
    before = client.get(f"/deletion-requests/{request_id}/certificate", headers=admin).json()["statements"]
    nonce = before["subject_commitment"]["nonce"]
    assert before["forgotten_class"] == PERSON
    assert before["subject_commitment"]["sha256"] == commitment(nonce, PERSON, uri)

    kept = backend.settings.model_copy(update={"redact_after_days": 1})
    assert sweep(kept, lambda _id: None)["redacted"] == 0  # finished moments ago: not yet
    now = backend.settings.model_copy(update={"redact_after_days": 0})
    assert sweep(now, lambda _id: None)["redacted"] == 1
    body = client.get(f"/deletion-requests/{request_id}", headers=admin).json()
    assert (body["forget_class"], body["forget_set"]["uri"]) == ("redacted", "redacted") and body["redacted_at"]
    assert PERSON not in json.dumps(body) and "photos" not in json.dumps(body)
    assert body["events"][-1]["event"] == "redacted"
    with session_scope(backend.settings.database) as session:
        row = session.get(DeletionRequest, request_id)
        assert row.subject_nonce is None and row.subject_commitment == commitment(nonce, PERSON, uri)
        tokens = [c.token for c in session.scalars(select(Certificate))]
    assert tokens == [""]  # the signed text that named the person is gone; the holder has their copy
    after = client.get(f"/deletion-requests/{request_id}/certificate", headers=admin).json()["statements"]
    assert after["forgotten_class"] is None and "nonce" not in after["subject_commitment"]
    assert after["subject_commitment"]["sha256"] == before["subject_commitment"]["sha256"]
    assert after["evidence"]["forget_set"]["accuracy_after"] is not None  # the figures stay, re-keyed
    assert after["evidence"]["generalisation_check"]["accuracy"] == before["evidence"]["generalisation_check"]["accuracy"]
    verified = audit_verify(backend)  # the trail never held the person: its chain still verifies
    assert verified.returncode == 0 and "intact" in verified.stderr
    if backend.name == "embedded":  # the database's files, write-ahead log included, hold neither the
        home = backend.settings.home  # forget set nor the nonce (the model's card still names its classes)
        for file in (home / "lethe.db", home / "lethe.db-wal"):
            held = file.read_bytes() if file.exists() else b""
            assert f"{PERSON} photos".encode() not in held and nonce.encode() not in held, file


def test_a_digit_class_keeps_its_figures_once_redacted(backend, client, admin, digits, digits_model):
    """Classes that cannot be names are not scrubbed from text, but a redacted request's figures are
    still re-keyed from its class: its certificate states the same evidence after redaction."""
    assert register_digits(client, admin, digits_model).status_code == 201
    request_id = client.post("/deletion-requests", headers=admin, json=request_body(digits)).json()["id"]
    with session_scope(backend.settings.database) as session:
        model_id = session.scalar(select(RegisteredModel.id))
    process_model(backend.settings, model_id, "w1")
    before = client.get(f"/deletion-requests/{request_id}/certificate", headers=admin).json()["statements"]["evidence"]
    sweep(backend.settings.model_copy(update={"redact_after_days": 0}), lambda _id: None)
    after = client.get(f"/deletion-requests/{request_id}/certificate", headers=admin).json()["statements"]["evidence"]
    assert after == before
