"""Deletion-request endpoints: accept (202, idempotent), read, list (filters, cursor), cancel, retry, extend; bad input is 4xx."""

from __future__ import annotations

import base64
import json
from datetime import datetime, timedelta, timezone

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from service.app import create_app
from service.db import session_scope
from service.deletion_requests.models import AuditEvent, DeletionRequest, RequestStatus
from service.deletion_requests.transitions import transition
from tests.service.conftest import make_key, register_digits, request_body

PROBLEM_JSON = "application/problem+json"
DAY = timedelta(days=1)


def parse(value: str) -> datetime:
    return datetime.fromisoformat(value)


def now() -> datetime:
    return datetime.now(timezone.utc)


def assert_problem(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM_JSON)
    problem = response.json()
    assert problem["status"] == status and problem["detail"] and problem["title"]
    if code is not None:
        assert problem["code"] == code, problem
    return problem


@pytest.fixture
def model(client, admin, digits_model):
    response = register_digits(client, admin, digits_model)
    assert response.status_code == 201, response.text
    return "digits"


@pytest.fixture
def submit(client, admin, digits, model):
    """POST a deletion request for the digits model; keyword arguments change the body."""

    def post(external_id: str = "subject-1", forget_class: str = "3", received_at: datetime | str | None = None,
             headers: dict[str, str] | None = None, model: str = "digits", **changes):
        body = request_body(digits, external_id=external_id, forget_class=forget_class, model=model)
        if received_at is not None:
            body["received_at"] = received_at.isoformat() if isinstance(received_at, datetime) else received_at
        body.update(changes)
        return client.post("/deletion-requests", headers={**admin, **(headers or {})}, json=body)

    return post


@pytest.fixture
def accepted(submit) -> str:
    """The id of one queued request."""
    response = submit()
    assert response.status_code == 202, response.text
    return response.json()["id"]


def move(backend, request_id: str, *statuses: RequestStatus) -> None:
    """Walk a request through ``statuses`` the way the worker would (one transition each)."""
    with session_scope(backend.settings.database) as session:
        row = session.get(DeletionRequest, request_id)
        for status in statuses:
            transition(session=session, request=row, to=status, actor="worker:test")


def listed(client, headers, **params) -> list[str]:
    response = client.get("/deletion-requests", headers=headers, params=params)
    assert response.status_code == 200, response.text
    return [item["external_id"] for item in response.json()["items"]]


def assert_nothing_accepted(client, admin, enqueued) -> None:
    assert enqueued == []
    assert listed(client, admin) == []


# --- POST /deletion-requests --------------------------------------------------------------------------------------------

def test_a_request_is_accepted_queued_and_due_in_30_days(submit, enqueued):
    before = now()
    response = submit()
    after = now()
    assert response.status_code == 202, response.text
    body = response.json()
    assert set(body) == {"id", "status", "due_at"}
    assert body["status"] == "queued"
    assert response.headers["location"] == f"/deletion-requests/{body['id']}"
    assert before + 30 * DAY <= parse(body["due_at"]) <= after + 30 * DAY
    assert enqueued == [body["id"]]


def test_due_at_is_received_at_plus_the_deadline_30_days_in_these_tests(client, admin, submit):
    received_at = now() - 3 * DAY
    response = submit(received_at=received_at)
    assert response.status_code == 202
    assert parse(response.json()["due_at"]) == received_at + 30 * DAY
    read = client.get(response.headers["location"], headers=admin).json()
    assert parse(read["received_at"]) == received_at
    assert parse(read["due_at"]) == received_at + 30 * DAY


def test_received_at_in_another_timezone_is_the_same_instant(client, admin, submit):
    received_at = (now() - 2 * DAY).astimezone(timezone(timedelta(hours=-7)))
    response = submit(received_at=received_at)
    assert response.status_code == 202
    read = client.get(response.headers["location"], headers=admin).json()
    assert parse(read["received_at"]) == received_at
    assert parse(read["due_at"]) == received_at + 30 * DAY


def test_a_new_request_reads_back_with_its_deadline_and_audit_trail(client, admin, digits, submit):
    response = submit(external_id="subject-42", forget_class="7")
    body = client.get(response.headers["location"], headers=admin).json()
    assert body["id"] == response.json()["id"]
    assert body["external_id"] == "subject-42" and body["model"] == "digits" and body["forget_class"] == "7"
    assert body["forget_set"] == {"uri": f"file://{digits.train_class('7')}"}
    assert body["status"] == "queued"
    assert body["days_left"] == 29  # a few milliseconds less than 30 whole days
    assert body["at_risk"] is False and body["overdue"] is False
    assert body["queued_at"] is not None and body["started_at"] is None and body["finished_at"] is None
    assert body["extended_days"] == 0 and body["attempts"] == 0
    assert body["fulfilled_version"] is None and body["metrics"] is None and body["error"] is None
    assert [e["event"] for e in body["events"]] == ["created", "status:queued"]
    created, queued = body["events"]
    assert created["to_status"] == "received"
    assert (queued["from_status"], queued["to_status"]) == ("received", "queued")
    assert created["actor"].startswith("api-key:") and queued["actor"] == created["actor"]


def test_the_request_is_enqueued_only_after_it_is_committed(backend, admin, digits, digits_model):
    seen: list[tuple[str, str | None]] = []

    def enqueue(request_id: str) -> None:
        # Another connection must already see the committed, queued row when the broker gets the id.
        with session_scope(backend.settings.database) as session:
            row = session.get(DeletionRequest, request_id)
            seen.append((request_id, row.status if row else None))

    with TestClient(create_app(backend.settings, enqueue=enqueue)) as client:
        assert register_digits(client, admin, digits_model).status_code == 201
        response = client.post("/deletion-requests", headers=admin, json=request_body(digits))
        assert response.status_code == 202
    assert seen == [(response.json()["id"], "queued")]


def test_a_broker_outage_after_the_commit_answers_202_and_the_sweep_wakes_the_request(backend, admin, digits,
                                                                                         digits_model):
    def broker_down(request_id: str) -> None:
        raise ConnectionRefusedError("[Errno 111] Connection refused")

    with TestClient(create_app(backend.settings, enqueue=broker_down)) as client:
        assert register_digits(client, admin, digits_model).status_code == 201
        response = client.post("/deletion-requests", headers=admin, json=request_body(digits))
        assert response.status_code == 202, response.text
        assert client.get(response.headers["location"], headers=admin).json()["status"] == "queued"
        assert "lethe_enqueue_failures_total 1.0" in client.get("/metrics").text
    from worker.runs.sweep import sweep

    woken: list[str] = []
    sweep(backend.settings, woken.append)
    assert woken == [response.json()["id"]]


def test_a_request_29_days_old_is_at_risk(client, admin, submit):
    response = submit(received_at=now() - 29 * DAY)
    body = client.get(response.headers["location"], headers=admin).json()
    assert body["at_risk"] is True and body["overdue"] is False
    assert body["days_left"] == 0


def test_a_request_just_inside_the_last_quarter_is_at_risk_and_just_outside_is_not(client, admin, submit):
    # 30-day window: at risk from day 22.5 on
    inside = submit(external_id="inside", received_at=now() - timedelta(days=22, hours=13))
    outside = submit(external_id="outside", forget_class="4", received_at=now() - timedelta(days=22, hours=11))
    assert client.get(inside.headers["location"], headers=admin).json()["at_risk"] is True
    assert client.get(outside.headers["location"], headers=admin).json()["at_risk"] is False


def test_a_request_31_days_old_is_overdue_with_negative_days_left(client, admin, submit):
    response = submit(received_at=now() - 31 * DAY)
    assert response.status_code == 202
    body = client.get(response.headers["location"], headers=admin).json()
    assert body["overdue"] is True and body["at_risk"] is False
    assert body["days_left"] == -1  # one whole day (and a few milliseconds) late


# --- Idempotency and uniqueness -----------------------------------------------------------------------------------------

def test_the_same_idempotency_key_and_body_return_the_same_request_once(client, admin, submit, enqueued):
    first = submit(headers={"Idempotency-Key": "abc-123"})
    second = submit(headers={"Idempotency-Key": "abc-123"})
    assert first.status_code == second.status_code == 202
    assert first.json() == second.json()
    assert first.headers["location"] == second.headers["location"]
    assert enqueued == [first.json()["id"]]
    assert listed(client, admin) == ["subject-1"]


def test_the_same_idempotency_key_with_another_body_is_422(client, admin, submit, enqueued):
    first = submit(headers={"Idempotency-Key": "abc-123"})
    assert first.status_code == 202
    other = submit(external_id="subject-2", forget_class="4", headers={"Idempotency-Key": "abc-123"})
    assert_problem(other, 422, "idempotency_key_reused")
    assert enqueued == [first.json()["id"]]
    assert listed(client, admin) == ["subject-1"]


def test_an_idempotency_key_is_its_senders_two_clients_with_the_same_key_get_two_requests(backend, client, admin,
                                                                                          submit, enqueued):
    other_client = make_key(backend.settings, "requests:write", "requests:read")
    mine = submit(headers={"Idempotency-Key": "2026-12-01-0001"})
    theirs = submit(external_id="subject-2", forget_class="4", headers={**other_client, "Idempotency-Key": "2026-12-01-0001"})
    assert mine.status_code == theirs.status_code == 202, theirs.text
    assert mine.json()["id"] != theirs.json()["id"]
    again = submit(external_id="subject-2", forget_class="4", headers={**other_client, "Idempotency-Key": "2026-12-01-0001"})
    assert again.json()["id"] == theirs.json()["id"]
    assert len(enqueued) == 2


def test_an_idempotency_key_replays_even_when_received_at_was_given(submit, enqueued):
    received_at = now() - 2 * DAY
    first = submit(received_at=received_at, headers={"Idempotency-Key": "k"})
    second = submit(received_at=received_at, headers={"Idempotency-Key": "k"})
    assert first.json()["id"] == second.json()["id"]
    assert len(enqueued) == 1


def test_the_same_external_id_for_the_same_model_without_a_key_is_409(client, admin, submit, enqueued):
    assert submit().status_code == 202
    assert_problem(submit(), 409, "conflict")
    assert_problem(submit(forget_class="5"), 409, "conflict")
    assert len(enqueued) == 1
    assert listed(client, admin) == ["subject-1"]


def test_external_ids_are_unique_per_model_only(client, admin, digits_model, submit):
    assert register_digits(client, admin, digits_model, name="digits-b").status_code == 201
    assert submit(model="digits").status_code == 202
    assert submit(model="digits-b").status_code == 202


def test_an_idempotency_key_longer_than_200_characters_is_422(submit, client, admin, enqueued):
    assert_problem(submit(headers={"Idempotency-Key": "k" * 201}), 422, "invalid_input")
    assert_nothing_accepted(client, admin, enqueued)


# --- Bad input: 4xx problem+json, never 500, nothing stored or enqueued ---------------------------------------------------

def test_malformed_json_is_422(client, admin, model, enqueued):
    response = client.post("/deletion-requests", headers={**admin, "Content-Type": "application/json"},
                           content=b'{"external_id": "x", ')
    assert_problem(response, 422, "invalid_input")
    assert_nothing_accepted(client, admin, enqueued)


@pytest.mark.parametrize("body", [b"[]", b"null", b'"text"', b"42", b""], ids=["array", "null", "string", "number", "empty"])
def test_a_body_that_is_not_an_object_is_422(client, admin, model, enqueued, body):
    response = client.post("/deletion-requests", headers={**admin, "Content-Type": "application/json"}, content=body)
    assert_problem(response, 422, "invalid_input")
    assert_nothing_accepted(client, admin, enqueued)


def test_an_unknown_field_is_refused(client, admin, submit, enqueued):
    problem = assert_problem(submit(priority="high"), 422, "invalid_input")
    assert "priority" in problem["detail"]
    assert_nothing_accepted(client, admin, enqueued)


def test_an_unknown_field_in_the_forget_set_is_refused(client, admin, digits, submit, enqueued):
    forget_set = {"uri": f"file://{digits.train_class('3')}", "checksum": "abc"}
    assert_problem(submit(forget_set=forget_set), 422, "invalid_input")
    assert_nothing_accepted(client, admin, enqueued)


@pytest.mark.parametrize("field", ["external_id", "model", "forget_class", "forget_set"])
def test_a_missing_field_is_refused(client, admin, digits, model, enqueued, field):
    body = request_body(digits)
    del body[field]
    problem = assert_problem(client.post("/deletion-requests", headers=admin, json=body), 422, "invalid_input")
    assert field in problem["detail"]
    assert_nothing_accepted(client, admin, enqueued)


@pytest.mark.parametrize(("field", "value"), [("external_id", ""), ("external_id", "x" * 201), ("forget_class", 3),
                                              ("forget_class", ""), ("model", None), ("forget_set", "file:///x"),
                                              ("forget_set", {}), ("received_at", "yesterday")],
                         ids=["empty external_id", "201-char external_id", "class as a number", "empty class",
                              "null model", "forget_set as a string", "forget_set without uri", "received_at text"])
def test_a_field_of_the_wrong_type_or_size_is_refused(client, admin, digits, model, enqueued, field, value):
    body = {**request_body(digits), field: value}
    assert_problem(client.post("/deletion-requests", headers=admin, json=body), 422, "invalid_input")
    assert_nothing_accepted(client, admin, enqueued)


def test_an_unknown_model_is_refused(client, admin, submit, enqueued):
    problem = submit(model="nope")
    assert problem.status_code in (404, 422), problem.text
    assert problem.headers["content-type"].startswith(PROBLEM_JSON)
    assert "nope" in problem.json()["detail"]
    assert_nothing_accepted(client, admin, enqueued)


def test_an_unknown_class_is_refused_without_listing_the_models_classes(client, admin, submit, enqueued):
    problem = assert_problem(submit(forget_class="cat"), 422, "invalid_input")
    assert "cat" in problem["detail"]
    # In a face model the classes are people: a request writer may not learn who else is in it.
    assert not any(digit in problem["detail"] for digit in "0123456789")
    assert_nothing_accepted(client, admin, enqueued)


@pytest.mark.parametrize("uri", [
    "http://example.com/{root}/train/3",
    "https://example.com/faces.zip",
    "s3://bucket/train/3",
    "{root}/train/3",
    "train/3",
    "file:train/3",
    "file://otherhost{root}/train/3",
    "file://{root}/train/3?x=1",
    "file:///etc/passwd",
    "file:///",
    "file://{root}/../../etc",
    "file://{root}/train/../../../etc/passwd",
    "file://{root}/%2e%2e/%2e%2e/etc",
    "file://{root}/train/%2E%2E/%2E%2E/%2E%2E/etc/shadow",
    "file://{root}%2f..%2f..%2fetc",
    "file://{root}-evil/train/3",
    "file://{root}/train/3%00",
    "",
], ids=["http", "https", "s3", "bare absolute path", "relative path", "opaque file uri", "remote host", "query",
        "outside roots", "filesystem root", "dotdot traversal", "deep dotdot traversal", "encoded traversal",
        "upper-case encoded traversal", "encoded slashes", "sibling folder with the root as prefix", "encoded nul",
        "empty"])
def test_a_forget_set_uri_that_is_not_a_file_inside_the_data_roots_is_422(client, admin, digits, submit, enqueued, uri):
    response = submit(forget_set={"uri": uri.format(root=digits.root)})
    problem = assert_problem(response, 422)
    assert problem["code"] in ("invalid_input", "outside_data_roots")
    assert_nothing_accepted(client, admin, enqueued)


def test_a_traversal_is_reported_as_outside_the_data_roots(client, admin, digits, submit):
    problem = assert_problem(submit(forget_set={"uri": f"file://{digits.root}/../../etc"}), 422, "outside_data_roots")
    assert "/etc" in problem["detail"]


def test_a_uri_that_stays_inside_after_collapsing_dotdot_is_accepted(client, admin, digits, submit):
    uri = f"file://{digits.root}/train/9/../3"
    response = submit(forget_set={"uri": uri})
    assert response.status_code == 202, response.text


def test_received_at_in_the_future_is_refused(client, admin, submit, enqueued):
    problem = assert_problem(submit(received_at=now() + DAY), 422, "invalid_input")
    assert "future" in problem["detail"]
    assert_nothing_accepted(client, admin, enqueued)


def test_received_at_without_a_timezone_is_refused(client, admin, submit, enqueued):
    problem = assert_problem(submit(received_at="2024-05-01T12:00:00"), 422, "invalid_input")
    assert "received_at" in problem["detail"]
    assert_nothing_accepted(client, admin, enqueued)


def test_received_at_at_the_edge_of_the_calendar_is_refused_not_500(client, admin, submit, enqueued):
    response = submit(received_at="0001-01-01T00:00:00+05:00")
    assert response.status_code == 422, response.text
    assert enqueued == []


def test_a_body_over_64_kib_is_413(client, admin, digits, model, enqueued):
    body = {**request_body(digits), "external_id": "x" * (70 * 1024)}
    assert_problem(client.post("/deletion-requests", headers=admin, json=body), 413, "payload_too_large")
    assert_nothing_accepted(client, admin, enqueued)


def test_a_chunked_body_over_64_kib_is_413(client, admin, digits, model, enqueued):
    payload = json.dumps(request_body(digits)).encode() + b" " * (70 * 1024)
    response = client.post("/deletion-requests", headers={**admin, "Content-Type": "application/json"},
                           content=iter([payload]))
    assert response.status_code == 413, response.text
    assert enqueued == []


def test_a_nul_character_in_external_id_is_refused_or_stored_never_500(request, backend, client, admin, submit):
    response = submit(external_id="subject\x00-1")
    assert response.status_code in (202, 422), response.text


def test_refusing_the_last_remaining_class(client, admin, submit, enqueued):
    for digit in range(9):
        assert submit(external_id=f"s{digit}", forget_class=str(digit)).status_code == 202
    problem = assert_problem(submit(external_id="s9", forget_class="9"), 422, "invalid_input")
    assert "no class" in problem["detail"]
    assert len(enqueued) == 9


def test_the_last_class_is_accepted_again_once_another_request_is_canceled(client, admin, submit):
    ids = [submit(external_id=f"s{d}", forget_class=str(d)).json()["id"] for d in range(9)]
    assert client.post(f"/deletion-requests/{ids[0]}/cancel", headers=admin).status_code == 200
    assert submit(external_id="s9", forget_class="9").status_code == 202


# --- GET /deletion-requests: filters and cursor -------------------------------------------------------------------------

def test_list_filters_by_at_risk_and_overdue(client, admin, submit):
    submit(external_id="fresh", forget_class="1")
    submit(external_id="at-risk", forget_class="2", received_at=now() - 29 * DAY)
    submit(external_id="overdue", forget_class="3", received_at=now() - 31 * DAY)
    assert listed(client, admin, at_risk="true") == ["at-risk"]
    assert listed(client, admin, overdue="true") == ["overdue"]
    assert sorted(listed(client, admin, at_risk="false")) == ["fresh", "overdue"]
    assert sorted(listed(client, admin, overdue="false")) == ["at-risk", "fresh"]
    items = client.get("/deletion-requests", headers=admin, params={"at_risk": "true"}).json()["items"]
    assert items[0]["at_risk"] is True and items[0]["days_left"] == 0


def test_finished_requests_are_neither_at_risk_nor_overdue(client, admin, submit):
    response = submit(external_id="old", received_at=now() - 31 * DAY)
    client.post(f"{response.headers['location']}/cancel", headers=admin)
    body = client.get(response.headers["location"], headers=admin).json()
    assert (body["days_left"], body["at_risk"], body["overdue"]) == (None, False, False)
    assert listed(client, admin, overdue="true") == []


def test_list_filters_by_status(client, admin, submit):
    submit(external_id="a", forget_class="1")
    canceled = submit(external_id="b", forget_class="2").json()["id"]
    submit(external_id="c", forget_class="3")
    assert client.post(f"/deletion-requests/{canceled}/cancel", headers=admin).status_code == 200
    assert listed(client, admin, status="queued") == ["a", "c"]
    assert listed(client, admin, status="canceled") == ["b"]
    assert listed(client, admin, status=["queued", "canceled"]) == ["a", "b", "c"]
    assert listed(client, admin, status="completed") == []


def test_an_unknown_status_filter_is_422(client, admin, submit):
    assert_problem(client.get("/deletion-requests", headers=admin, params={"status": "done"}), 422, "invalid_input")


def test_list_filters_by_model(client, admin, digits_model, submit):
    assert register_digits(client, admin, digits_model, name="digits-b").status_code == 201
    submit(external_id="on-a", model="digits")
    submit(external_id="on-b", model="digits-b")
    assert listed(client, admin, model="digits") == ["on-a"]
    assert listed(client, admin, model="digits-b") == ["on-b"]
    assert listed(client, admin, model="nope") == []


def test_list_filters_by_due_before(client, admin, submit):
    submit(external_id="due-soon", forget_class="1", received_at=now() - 20 * DAY)
    submit(external_id="due-later", forget_class="2")
    assert listed(client, admin, due_before=(now() + 15 * DAY).isoformat()) == ["due-soon"]
    assert sorted(listed(client, admin, due_before=(now() + 31 * DAY).isoformat())) == ["due-later", "due-soon"]
    assert listed(client, admin, due_before=(now() - DAY).isoformat()) == []


def test_a_due_before_without_a_timezone_is_422_or_read_as_utc(client, admin, submit):
    submit(external_id="due-soon", forget_class="1", received_at=now() - 20 * DAY)
    response = client.get("/deletion-requests", headers=admin, params={"due_before": "2999-01-01T00:00:00"})
    assert response.status_code in (200, 422), response.text


@pytest.mark.parametrize("params", [{"at_risk": "maybe"}, {"overdue": "2"}, {"due_before": "soon"}, {"limit": "0"},
                                    {"limit": "201"}, {"limit": "ten"}],
                         ids=["at_risk", "overdue", "due_before", "limit 0", "limit 201", "limit text"])
def test_a_malformed_filter_is_422(client, admin, params):
    assert_problem(client.get("/deletion-requests", headers=admin, params=params), 422, "invalid_input")


def test_cursor_pagination_returns_every_request_once_in_stable_order(client, admin, submit):
    created = [submit(external_id=f"s{d}", forget_class=str(d)).json()["id"] for d in range(5)]
    pages, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        response = client.get("/deletion-requests", headers=admin, params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        pages.append([item["id"] for item in page["items"]])
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert len(pages) < 10, "the cursor does not advance"
    assert [len(p) for p in pages] == [2, 2, 1]
    seen = [request_id for page in pages for request_id in page]
    assert seen == created  # oldest first, each exactly once
    again = client.get("/deletion-requests", headers=admin, params={"limit": 50}).json()
    assert [item["id"] for item in again["items"]] == created and again["next_cursor"] is None


def test_a_cursor_is_stable_when_new_requests_arrive(client, admin, submit):
    first = [submit(external_id=f"s{d}", forget_class=str(d)).json()["id"] for d in range(3)]
    page = client.get("/deletion-requests", headers=admin, params={"limit": 2}).json()
    newer = submit(external_id="s3", forget_class="3").json()["id"]
    rest = client.get("/deletion-requests", headers=admin, params={"limit": 2, "cursor": page["next_cursor"]}).json()
    assert [i["id"] for i in page["items"]] + [i["id"] for i in rest["items"]] == first + [newer]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize("cursor", ["not a cursor!", "%%%", _b64(b"not json"), _b64(b"5"), _b64(b'["x"]'),
                                    _b64(b'["yesterday", "id"]'), _b64(b"[1, 2]"), _b64(b'{"a": 1}'), _b64(b"\xff\xfe")],
                         ids=["not base64", "percent signs", "not json", "a number", "one element", "bad date",
                              "numbers", "an object", "not utf-8"])
def test_a_malformed_cursor_is_422(client, admin, submit, cursor):
    submit()
    assert_problem(client.get("/deletion-requests", headers=admin, params={"cursor": cursor}), 422, "invalid_input")


def test_a_cursor_with_a_naive_timestamp_is_422(client, admin, submit):
    submit()
    cursor = _b64(json.dumps(["2024-01-01T00:00:00", "some-id"]).encode())
    assert_problem(client.get("/deletion-requests", headers=admin, params={"cursor": cursor}), 422, "invalid_input")


def test_a_cursor_whose_timestamp_utc_cannot_hold_is_422(client, admin, submit):
    submit()
    cursor = _b64(json.dumps(["0001-01-01T00:00:00+14:00", "7d0c3b9e-4f7e-4a3c-9d0e-2b1f6c8a5e41"]).encode())
    assert_problem(client.get("/deletion-requests", headers=admin, params={"cursor": cursor}), 422, "invalid_input")


@pytest.mark.parametrize("due_before", ["9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00"])
def test_a_due_before_that_utc_cannot_hold_is_422(client, admin, submit, due_before):
    submit()
    assert_problem(client.get("/deletion-requests", headers=admin, params={"due_before": due_before}), 422,
                   "invalid_input")


def test_a_cursor_over_500_characters_is_422(client, admin):
    assert_problem(client.get("/deletion-requests", headers=admin, params={"cursor": "a" * 501}), 422, "invalid_input")


# --- GET /deletion-requests/{id} -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("method", "suffix", "body"), [("GET", "", None), ("POST", "/cancel", None),
                                                        ("POST", "/retry", None),
                                                        ("POST", "/extend", {"days": 5, "reason": "complex case"})],
                         ids=["get", "cancel", "retry", "extend"])
def test_an_unknown_request_id_is_404(client, admin, model, method, suffix, body):
    response = client.request(method, f"/deletion-requests/00000000-0000-4000-8000-000000000000{suffix}",
                              headers=admin, json=body)
    assert_problem(response, 404, "not_found")


def test_a_nul_in_a_request_id_is_404_not_500(request, backend, client, admin, model):
    assert_problem(client.get("/deletion-requests/abc%00def", headers=admin), 404, "not_found")


def test_a_nul_in_the_model_filter_is_never_500(request, backend, client, admin, model):
    response = client.get("/deletion-requests", headers=admin, params={"model": "digits\x00"})
    assert response.status_code in (200, 422), response.text


# --- POST /deletion-requests/{id}/cancel -----------------------------------------------------------------------------------

def test_cancel_a_queued_request(client, admin, backend, accepted):
    response = client.post(f"/deletion-requests/{accepted}/cancel", headers=admin, json={"reason": "withdrawn"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "canceled"
    assert body["finished_at"] is not None
    last = body["events"][-1]
    assert last["event"] == "status:canceled"
    assert (last["from_status"], last["to_status"]) == ("queued", "canceled")
    assert last["detail"] == {"reason": "withdrawn"}
    assert client.get(f"/deletion-requests/{accepted}", headers=admin).json()["status"] == "canceled"


def test_cancel_without_a_body(client, admin, accepted):
    response = client.post(f"/deletion-requests/{accepted}/cancel", headers=admin)
    assert response.status_code == 200 and response.json()["status"] == "canceled"


def test_a_canceled_request_cannot_be_canceled_again(client, admin, accepted):
    assert client.post(f"/deletion-requests/{accepted}/cancel", headers=admin).status_code == 200
    problem = assert_problem(client.post(f"/deletion-requests/{accepted}/cancel", headers=admin), 409,
                             "invalid_transition")
    assert problem["current_status"] == "canceled"
    events = client.get(f"/deletion-requests/{accepted}", headers=admin).json()["events"]
    assert [e["event"] for e in events].count("status:canceled") == 1


def test_cancel_a_running_request_asks_it_to_stop_at_its_next_step(client, admin, backend, accepted):
    move(backend, accepted, RequestStatus.RUNNING)
    response = client.post(f"/deletion-requests/{accepted}/cancel", headers=admin)
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "running"
    assert body["events"][-1]["event"] == "cancel_requested"
    with session_scope(backend.settings.database) as session:
        assert session.get(DeletionRequest, accepted).cancel_requested is True


@pytest.mark.parametrize("path", [[RequestStatus.COMPLETED], [RequestStatus.COMPLETED, RequestStatus.PROPAGATED],
                                  [RequestStatus.REJECTED]], ids=["completed", "propagated", "rejected"])
def test_a_finished_request_cannot_be_canceled(client, admin, backend, accepted, path):
    move(backend, accepted, *path)
    assert_problem(client.post(f"/deletion-requests/{accepted}/cancel", headers=admin), 409, "invalid_transition")


@pytest.mark.parametrize("body", [{"reason": "x" * 2001}, {"why": "no"}, [1]], ids=["reason too long", "unknown field",
                                                                                   "array"])
def test_a_bad_cancel_body_is_422_and_cancels_nothing(client, admin, accepted, body):
    assert_problem(client.post(f"/deletion-requests/{accepted}/cancel", headers=admin, json=body), 422, "invalid_input")
    assert client.get(f"/deletion-requests/{accepted}", headers=admin).json()["status"] == "queued"


# --- POST /deletion-requests/{id}/retry ------------------------------------------------------------------------------------

@pytest.mark.parametrize("before", [
    [], [RequestStatus.CANCELED], [RequestStatus.COMPLETED], [RequestStatus.COMPLETED, RequestStatus.PROPAGATED],
    [RequestStatus.REJECTED], [RequestStatus.RUNNING],
], ids=["queued", "canceled", "completed", "propagated", "rejected", "running"])
def test_only_a_failed_request_can_be_retried(client, admin, backend, accepted, enqueued, before):
    move(backend, accepted, *before)
    assert_problem(client.post(f"/deletion-requests/{accepted}/retry", headers=admin), 409, "invalid_transition")
    assert enqueued == [accepted]


def test_retry_a_failed_request_queues_it_again_with_a_new_seed(client, admin, backend, accepted, enqueued):
    move(backend, accepted, RequestStatus.RUNNING, RequestStatus.FAILED)
    with session_scope(backend.settings.database) as session:
        row = session.get(DeletionRequest, accepted)
        row.error, old_seed = "gate failed", row.seed

    response = client.post(f"/deletion-requests/{accepted}/retry", headers=admin)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "queued" and body["error"] is None
    assert enqueued == [accepted, accepted]
    last = body["events"][-1]
    assert last["event"] == "status:queued"
    assert (last["from_status"], last["to_status"]) == ("failed", "queued")
    assert last["detail"]["retry"] is True
    assert last["actor"].startswith("api-key:")
    with session_scope(backend.settings.database) as session:
        row = session.get(DeletionRequest, accepted)
        assert row.seed == last["detail"]["seed"]
        assert row.seed != old_seed


def test_each_retry_draws_another_seed(client, admin, backend, accepted):
    seeds = set()
    for _ in range(3):
        move(backend, accepted, RequestStatus.RUNNING, RequestStatus.FAILED)
        response = client.post(f"/deletion-requests/{accepted}/retry", headers=admin)
        seeds.add(response.json()["events"][-1]["detail"]["seed"])
    assert len(seeds) == 3


def test_a_request_that_ran_max_attempts_times_is_not_retried_again(client, admin, backend, accepted, enqueued):
    move(backend, accepted, RequestStatus.RUNNING, RequestStatus.FAILED)
    with session_scope(backend.settings.database) as session:
        session.get(DeletionRequest, accepted).attempts = backend.settings.max_attempts  # LETHE_MAX_ATTEMPTS runs
    problem = assert_problem(client.post(f"/deletion-requests/{accepted}/retry", headers=admin), 409,
                             "attempts_exhausted")
    assert "LETHE_MAX_ATTEMPTS" in problem["detail"] and problem["attempts"] == backend.settings.max_attempts
    assert client.get(f"/deletion-requests/{accepted}", headers=admin).json()["status"] == "failed"
    assert enqueued == [accepted]


# --- POST /deletion-requests/{id}/extend -----------------------------------------------------------------------------------

def test_extend_moves_due_at_and_is_audit_logged(client, admin, accepted):
    due_at = parse(client.get(f"/deletion-requests/{accepted}", headers=admin).json()["due_at"])
    response = client.post(f"/deletion-requests/{accepted}/extend", headers=admin,
                           json={"days": 30, "reason": "complex request (Art. 12(3))"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert parse(body["due_at"]) == due_at + 30 * DAY
    assert body["extended_days"] == 30
    assert body["days_left"] == 59
    event = body["events"][-1]
    assert event["event"] == "extended"
    assert event["detail"]["days"] == 30 and event["detail"]["reason"] == "complex request (Art. 12(3))"
    assert parse(event["detail"]["due_at"]) == parse(body["due_at"])
    assert body["status"] == "queued"


def test_by_default_the_deadline_is_one_calendar_month_clamped_to_the_months_end(backend, admin, digits, digits_model):
    settings = backend.settings.model_copy(update={"deadline": "P1M"})
    with TestClient(create_app(settings, enqueue=lambda _id: None)) as client:
        assert register_digits(client, admin, digits_model).status_code == 201
        for i, (received, due) in enumerate([("2026-01-31T10:00:00+00:00", "2026-02-28T10:00:00+00:00"),
                                              ("2026-03-31T23:30:00+00:00", "2026-04-30T23:30:00+00:00")]):
            body = request_body(digits, external_id=f"subject-{i}", forget_class=str(i))
            response = client.post("/deletion-requests", headers=admin, json={**body, "received_at": received})
            assert response.status_code == 202, response.text
            assert parse(response.json()["due_at"]) == parse(due)


def test_a_due_date_does_not_move_when_the_deadline_setting_changes_later(backend, admin, digits, digits_model, client,
                                                                          accepted):
    due_at = parse(client.get(f"/deletion-requests/{accepted}", headers=admin).json()["due_at"])
    later = backend.settings.model_copy(update={"deadline": "P45D"})  # the operator changes LETHE_DEADLINE
    with TestClient(create_app(later, enqueue=lambda _id: None)) as changed:
        assert parse(changed.get(f"/deletion-requests/{accepted}", headers=admin).json()["due_at"]) == due_at
        body = changed.post(f"/deletion-requests/{accepted}/extend", headers=admin,
                            json={"days": 10, "reason": "complex request"}).json()
    assert parse(body["due_at"]) == due_at + 10 * DAY


def test_extending_takes_an_at_risk_request_out_of_risk(client, admin, submit):
    request_id = submit(received_at=now() - 29 * DAY).json()["id"]
    assert client.get(f"/deletion-requests/{request_id}", headers=admin).json()["at_risk"] is True
    body = client.post(f"/deletion-requests/{request_id}/extend", headers=admin,
                       json={"days": 30, "reason": "many requests"}).json()
    assert body["at_risk"] is False and body["days_left"] == 30


def test_extensions_add_up_to_60_days_at_most(client, admin, accepted):
    url = f"/deletion-requests/{accepted}/extend"
    assert client.post(url, headers=admin, json={"days": 30, "reason": "first"}).status_code == 200
    assert client.post(url, headers=admin, json={"days": 30, "reason": "second"}).status_code == 200
    assert_problem(client.post(url, headers=admin, json={"days": 1, "reason": "third"}), 422, "invalid_input")
    assert client.get(f"/deletion-requests/{accepted}", headers=admin).json()["extended_days"] == 60


def test_a_second_extension_past_60_days_in_total_is_422_and_changes_nothing(client, admin, accepted):
    url = f"/deletion-requests/{accepted}/extend"
    first = client.post(url, headers=admin, json={"days": 30, "reason": "first"}).json()
    assert_problem(client.post(url, headers=admin, json={"days": 31, "reason": "second"}), 422, "invalid_input")
    after = client.get(f"/deletion-requests/{accepted}", headers=admin).json()
    assert after["due_at"] == first["due_at"] and after["extended_days"] == 30
    assert [e["event"] for e in after["events"]].count("extended") == 1


@pytest.mark.parametrize("body", [{"days": 61, "reason": "too long"}, {"days": 0, "reason": "nothing"},
                                  {"days": -5, "reason": "shorten"}, {"days": 10}, {"days": 10, "reason": ""},
                                  {"days": 10, "reason": "ok"}, {"reason": "no days"},
                                  {"days": 10, "reason": "fine", "extra": 1}, {"days": "ten", "reason": "text"}],
                         ids=["61 days", "0 days", "negative", "no reason", "empty reason", "2-char reason", "no days",
                              "unknown field", "days as text"])
def test_a_bad_extension_is_422_and_changes_nothing(client, admin, accepted, body):
    due_at = client.get(f"/deletion-requests/{accepted}", headers=admin).json()["due_at"]
    assert_problem(client.post(f"/deletion-requests/{accepted}/extend", headers=admin, json=body), 422, "invalid_input")
    after = client.get(f"/deletion-requests/{accepted}", headers=admin).json()
    assert after["due_at"] == due_at and after["extended_days"] == 0


def test_extend_a_canceled_request_is_409(client, admin, accepted):
    assert client.post(f"/deletion-requests/{accepted}/cancel", headers=admin).status_code == 200
    problem = assert_problem(client.post(f"/deletion-requests/{accepted}/extend", headers=admin,
                                         json={"days": 10, "reason": "too late"}), 409)
    assert problem["code"] in ("conflict", "invalid_transition")


def test_extend_a_running_request(client, admin, backend, accepted):
    move(backend, accepted, RequestStatus.RUNNING)
    response = client.post(f"/deletion-requests/{accepted}/extend", headers=admin, json={"days": 5, "reason": "slow"})
    assert response.status_code == 200 and response.json()["extended_days"] == 5


def test_audit_events_are_recorded_in_order_for_the_whole_story(client, admin, backend, accepted):
    client.post(f"/deletion-requests/{accepted}/extend", headers=admin, json={"days": 5, "reason": "busy"})
    client.post(f"/deletion-requests/{accepted}/cancel", headers=admin)
    with session_scope(backend.settings.database) as session:
        events = session.scalars(select(AuditEvent).where(AuditEvent.request_id == accepted)
                                 .order_by(AuditEvent.id)).all()
        assert [e.event for e in events] == ["created", "status:queued", "extended", "status:canceled"]
        assert all(a.at <= b.at for a, b in zip(events, events[1:]))
