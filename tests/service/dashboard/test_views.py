"""Dashboard pages over HTTP: login and logout, CSRF, the requests table (badges, filters, sort, pages,
counts, live refresh), CSV export, the detail page with cancel and retry, and the models page."""

from __future__ import annotations

import csv
import functools
import io
import re
from datetime import timedelta
from urllib.parse import parse_qs, urlsplit

import pytest

from sqlalchemy import select, update

from service.auth.service import create_key, revoke_key
from service.dashboard import service as dashboard_service, views as dashboard_views
from service.dashboard.models import DashboardSession
from service.db import session_scope, utcnow
from service.deletion_requests.models import AuditEvent, DeletionRequest, RequestStatus
from service.deletion_requests.transitions import transition
from service.webhooks import service as webhooks
from service.webhooks.delivery import deliver_due
from service.webhooks.models import WebhookDelivery
from tests.service.conftest import make_key, request_body
from tests.service_fixtures import settings_from
from tests.service.dashboard.conftest import csrf_of, log_in
from tests.service.dashboard.seed import BADGES, PER_CLASS_BEFORE, completed_run_metrics

PAGES = ["/dashboard/requests", "/dashboard/models", "/dashboard/webhooks", "/dashboard/requests.csv",
         "/dashboard/requests/00000000-0000-0000-0000-000000000000"]


def row_of(html: str, request_id: str) -> str:
    match = re.search(rf'<tr data-request="{request_id}">(.*?)</tr>', html, re.S)
    assert match, f"request {request_id} is not in the table"
    return match.group(1)


def shown_ids(html: str) -> list[str]:
    return re.findall(r'<tr data-request="([^"]+)">', html)


def login_redirect(response) -> str:
    assert response.status_code == 303
    url = urlsplit(response.headers["location"])
    assert url.path == "/dashboard/login"
    return parse_qs(url.query)["next"][0]


# --- login, logout, sessions ----------------------------------------------------------------------

@pytest.mark.parametrize("page", PAGES)
def test_every_page_sends_a_visitor_without_a_login_to_the_login_form(client, page):
    assert login_redirect(client.get(page, follow_redirects=False)) == page


def test_the_live_table_sends_a_logged_out_browser_to_log_in_for_the_page_it_shows(client):
    response = client.get("/dashboard/requests/live", headers={"X-Dashboard-Page": "/dashboard/requests?overdue=1"},
                          follow_redirects=False)
    assert login_redirect(response) == "/dashboard/requests?overdue=1"


def test_logging_in_sets_an_http_only_same_site_session_cookie_and_goes_where_the_visitor_was_going(client, backend):
    response = log_in(client, make_key(backend.settings, "requests:read", "models:read"), next="/dashboard/models")
    assert response.status_code == 303 and response.headers["location"] == "/dashboard/models"
    cookie = next(v for k, v in response.headers.multi_items() if k == "set-cookie" and v.startswith("lethe_session="))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/dashboard" in cookie
    assert client.get("/dashboard/models").status_code == 200


@pytest.mark.parametrize("scopes, status, message", [
    (None, 401, "unknown or revoked API key"),
    (("models:read", "models:write"), 403, "requests:read"),
])
def test_login_needs_a_live_key_with_requests_read(client, backend, scopes, status, message):
    key = make_key(backend.settings, *scopes) if scopes else {"Authorization": "Bearer lethe_not-a-key"}
    response = log_in(client, key)
    assert response.status_code == status
    assert message in response.text and 'role="alert"' in response.text
    assert "lethe_session" not in response.headers.get("set-cookie", "")
    assert client.get("/dashboard/requests", follow_redirects=False).status_code == 303


def test_the_login_form_refuses_a_post_without_its_own_csrf_token(client, backend):
    key = make_key(backend.settings, "requests:read")["Authorization"].removeprefix("Bearer ")
    client.get("/dashboard/login")
    response = client.post("/dashboard/login", data={"api_key": key, "csrf_token": "forged"}, follow_redirects=False)
    assert response.status_code == 403 and "security token" in response.text
    assert client.get("/dashboard/requests", follow_redirects=False).status_code == 303


@pytest.mark.parametrize("target", ["https://evil.example/", "//evil.example/x", "/models", "/dashboard\\..\\x"])
def test_login_only_redirects_within_the_dashboard(client, backend, target):
    response = log_in(client, make_key(backend.settings, "requests:read"), next=target)
    assert response.headers["location"] == "/dashboard/requests"


def test_logging_out_ends_the_session_on_the_server_too(client, reader):
    token = client.cookies.get("lethe_session")
    page = client.get("/dashboard/requests")
    response = client.post("/dashboard/logout", data={"csrf_token": csrf_of(page.text)}, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/dashboard/login"
    client.cookies.set("lethe_session", token, path="/dashboard")  # a copy of the cookie kept by a thief
    assert client.get("/dashboard/requests", follow_redirects=False).status_code == 303


def test_logout_needs_the_csrf_token(client, reader):
    response = client.post("/dashboard/logout", data={"csrf_token": "forged"}, follow_redirects=False)
    assert response.status_code == 403
    assert client.get("/dashboard/requests").status_code == 200


def test_an_expired_login_on_a_form_comes_back_to_the_page_the_form_was_on(client, reader, seeded, backend):
    html = client.get(f"/dashboard/requests/{seeded.ids['due-in-3']}").text
    with session_scope(backend.settings.database) as session:
        session.execute(update(DashboardSession).values(expires_at=utcnow()))
    response = client.post(f"/dashboard/requests/{seeded.ids['due-in-3']}/cancel",
                           data={"csrf_token": csrf_of(html), "reason": "x"}, follow_redirects=False)
    assert login_redirect(response) == f"/dashboard/requests/{seeded.ids['due-in-3']}"


def test_the_models_page_needs_the_models_read_scope_like_the_api(client, backend, seeded):
    assert log_in(client, make_key(backend.settings, "requests:read")).status_code == 303
    assert 'href="/dashboard/models"' not in client.get("/dashboard/requests").text
    response = client.get("/dashboard/models")
    assert response.status_code == 403 and "models:read" in response.text


def test_revoking_the_key_ends_its_dashboard_sessions(client, backend, reader):
    with session_scope(backend.settings.database) as session:
        [login] = session.scalars(select(DashboardSession)).all()
        revoke_key(session=session, name=login.api_key.name)
    assert client.get("/dashboard/requests", follow_redirects=False).status_code == 303


def test_an_expired_session_needs_a_new_login(client, backend, reader):
    with session_scope(backend.settings.database) as session:
        session.execute(update(DashboardSession).values(expires_at=utcnow()))
    assert client.get("/dashboard/requests", follow_redirects=False).status_code == 303


def test_pages_carry_a_strict_content_security_policy_and_load_nothing_from_elsewhere(client, reader, seeded):
    for page in ("/dashboard/requests", "/dashboard/models", f"/dashboard/requests/{seeded.ids['done']}",
                 "/dashboard/login"):
        response = client.get(page)
        assert response.status_code == 200
        assert "default-src 'self'" in response.headers["content-security-policy"]
        assert response.headers["cache-control"] == "no-store"
        assert not re.search(r'(src|href)="(https?:)?//', response.text), page
        for asset in re.findall(r'(?:src|href)="(/dashboard/static/[^"]+)"', response.text):
            assert client.get(asset).status_code == 200, asset


# --- the requests table ---------------------------------------------------------------------------

def test_the_table_shows_each_request_with_its_deadline_badge(client, reader, seeded):
    html = client.get("/dashboard/requests").text
    for external_id, expected in BADGES.items():
        row = row_of(html, seeded.ids[external_id])
        assert external_id in row
        if expected is None:  # finished requests show no badge, and their version
            assert "class=\"badge" not in row and "v2" in row and "status-propagated" in row
        else:
            text, tone = expected
            assert f'<span class="badge tone-{tone}">{text}</span>' in row


def test_counts_per_status_head_the_table(client, reader, seeded):
    html = client.get("/dashboard/requests").text
    assert re.search(r"<strong>3</strong> queued", html) and re.search(r"<strong>1</strong> propagated", html)
    assert re.search(r"<strong>1</strong> at risk", html) and re.search(r"<strong>1</strong> overdue", html)
    assert re.search(r"<strong>0</strong> failed", html)
    overdue_only = client.get("/dashboard/requests", params={"overdue": "1"}).text
    assert 'href="/dashboard/requests?status=propagated"' in overdue_only  # a count shows its whole status


def test_filters_by_status_model_and_overdue(client, reader, seeded):
    ids = seeded.ids
    assert shown_ids(client.get("/dashboard/requests", params={"status": "propagated"}).text) == [ids["done"]]
    assert shown_ids(client.get("/dashboard/requests", params={"overdue": "1"}).text) == [ids["overdue"]]
    assert len(shown_ids(client.get("/dashboard/requests", params={"model": "digits"}).text)) == 4
    assert shown_ids(client.get("/dashboard/requests", params={"model": "other"}).text) == []
    both = client.get("/dashboard/requests", params={"status": "queued", "overdue": "1"}).text
    assert shown_ids(both) == [ids["overdue"]]


def test_sorts_by_due_date_either_way(client, reader, seeded):
    ids = seeded.ids
    soonest = [ids[k] for k in ("overdue", "due-in-3", "due-in-20", "done")]  # done was received 5 days ago
    assert shown_ids(client.get("/dashboard/requests").text) == soonest
    assert shown_ids(client.get("/dashboard/requests", params={"sort": "-due"}).text) == soonest[::-1]


@pytest.mark.parametrize("params", [{"status": "lost"}, {"sort": "name"}, {"page": "0"}, {"model": "../x"},
                                    {"overdue": "yes"}])
def test_bad_filters_are_a_readable_4xx_page_not_json(client, reader, params):
    response = client.get("/dashboard/requests", params=params)
    assert response.status_code == 422
    assert response.headers["content-type"].startswith("text/html") and "Back to the requests" in response.text


def test_pages_through_the_table_keeping_filters(client, reader, seeded, monkeypatch):
    monkeypatch.setattr(dashboard_service, "PAGE_SIZE", 3)
    first = client.get("/dashboard/requests", params={"model": "digits"}).text
    assert len(shown_ids(first)) == 3 and "1–3 of 4" in first and "page 1 of 2" in first
    assert 'href="/dashboard/requests?model=digits&amp;page=2" rel="next"' in first
    second = client.get("/dashboard/requests", params={"model": "digits", "page": 2}).text
    assert len(shown_ids(second)) == 1 and "4–4 of 4" in second
    assert set(shown_ids(first) + shown_ids(second)) == set(seeded.ids.values())
    beyond = client.get("/dashboard/requests", params={"page": 9}).text  # clamps to the last page
    assert "page 2 of 2" in beyond


def test_the_live_fragment_is_the_counts_and_table_alone_and_sees_new_requests(client, reader, seeded, admin, digits):
    before = client.get("/dashboard/requests/live")
    assert before.status_code == 200 and "<html" not in before.text and len(shown_ids(before.text)) == 4
    page = client.get("/dashboard/requests").text
    assert 'data-live="/dashboard/requests/live?' in page
    assert client.post("/deletion-requests", headers=admin, json=request_body(digits, "late-arrival", "5")).status_code == 202
    assert len(shown_ids(client.get("/dashboard/requests/live").text)) == 5


# --- CSV ------------------------------------------------------------------------------------------

def read_csv(response) -> list[dict[str, str]]:
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
    assert response.headers["content-disposition"].startswith('attachment; filename="deletion-requests-')
    return list(csv.DictReader(io.StringIO(response.text)))


def test_csv_export_has_every_request_with_the_tables_filters(client, reader, seeded):
    rows = read_csv(client.get("/dashboard/requests.csv"))
    assert list(rows[0]) == list(dashboard_service.CSV_COLUMNS)
    assert [r["external_id"] for r in rows] == ["overdue", "due-in-3", "due-in-20", "done"]
    done = rows[-1]
    assert done["status"] == "propagated" and done["fulfilled_version"] == "2" and done["days_left"] == ""
    overdue = rows[0]
    assert overdue["overdue"] == "True" and overdue["days_left"] == "-3"
    assert [r["external_id"] for r in read_csv(client.get("/dashboard/requests.csv", params={"overdue": "1"}))] \
        == ["overdue"]
    assert read_csv(client.get("/dashboard/requests.csv", params={"status": "failed"})) == []


@pytest.mark.parametrize("sort", list(dashboard_service.SORTS))
def test_a_csv_read_in_batches_and_spooled_to_disk_is_the_tables_order(client, reader, seeded, sort, monkeypatch):
    """The export streams its rows a batch at a time and spools them to a file past a size: a batch
    of one and a spool of 64 bytes give the same file, in the table's order, for every sort."""
    monkeypatch.setattr(dashboard_service, "csv_rows", functools.partial(dashboard_service.csv_rows, batch=1))
    monkeypatch.setattr(dashboard_views, "CSV_SPOOL_BYTES", 64)
    response = client.get("/dashboard/requests.csv", params={"sort": sort})
    assert int(response.headers["content-length"]) == len(response.content)
    table = shown_ids(client.get("/dashboard/requests", params={"sort": sort}).text)
    assert [r["id"] for r in read_csv(response)] == table and len(table) == 4


def test_the_csv_exports_file_is_closed_once_sent_or_abandoned(client, reader, seeded, monkeypatch):
    spools = []
    real = dashboard_views.tempfile.SpooledTemporaryFile
    monkeypatch.setattr(dashboard_views.tempfile, "SpooledTemporaryFile",
                        lambda *a, **k: spools.append(real(*a, **k)) or spools[-1])
    monkeypatch.setattr(dashboard_views, "CSV_SPOOL_BYTES", 64)  # a file on disk
    assert len(read_csv(client.get("/dashboard/requests.csv"))) == 4
    with client.stream("GET", "/dashboard/requests.csv") as response:
        next(response.iter_raw(16))  # a client that reads a little and goes
    assert len(spools) == 2 and all(spool.closed for spool in spools)


def test_csv_cells_never_start_a_spreadsheet_formula(client, reader, seeded, admin, digits):
    body = request_body(digits, "=HYPERLINK(\"http://x\")", "5")
    assert client.post("/deletion-requests", headers=admin, json=body).status_code == 202
    rows = read_csv(client.get("/dashboard/requests.csv", params={"sort": "-received"}))
    assert rows[0]["external_id"] == "'=HYPERLINK(\"http://x\")"


# --- detail, cancel, retry ------------------------------------------------------------------------

def test_the_detail_page_shows_the_audit_trail_and_the_evidence_of_forgetting(client, reader, seeded):
    html = client.get(f"/dashboard/requests/{seeded.ids['done']}").text
    events = re.findall(r"<strong>([a-z :]+)</strong>", html.split("Audit trail")[1])
    assert events == ["created", "queued", "running", "completed", "propagated"]
    evidence = html.split("Evidence of forgetting")[1].split("Audit trail")[0]
    metrics = completed_run_metrics()
    for value in ("100.0 %", "0.7 %", "97.2 %", "0.0 %", "96.3 %", "94.8 %"):
        assert value in evidence
    assert "<dd>7</dd>" in evidence and "<dd>4.2</dd>" in evidence and metrics["method"] in evidence
    assert "digits v2" in html and "Cancel request" not in html


def test_a_failed_request_shows_why(client, reader, seeded, backend):
    with session_scope(backend.settings.database) as session:
        row = session.get(DeletionRequest, seeded.ids["due-in-3"])
        transition(session=session, request=row, to=RequestStatus.RUNNING, actor="worker:test")
        transition(session=session, request=row, to=RequestStatus.FAILED, actor="worker:test")
        row.error = "forget-set accuracy 4.0 % missed the 1.0 % target after 100 steps"
    html = client.get(f"/dashboard/requests/{seeded.ids['due-in-3']}").text
    assert 'role="alert"' in html and "missed the 1.0 % target" in html


def test_a_reader_sees_no_buttons_and_cannot_post_them(client, reader, seeded, backend):
    request_id = seeded.ids["due-in-3"]
    html = client.get(f"/dashboard/requests/{request_id}").text
    assert "Cancel request" not in html and "Retry" not in html
    response = client.post(f"/dashboard/requests/{request_id}/cancel", data={"csrf_token": csrf_of(html),
                                                                             "reason": "no"})
    assert response.status_code == 403 and "requests:write" in response.text
    with session_scope(backend.settings.database) as session:
        assert session.get(DeletionRequest, request_id).status == RequestStatus.QUEUED


def test_a_writer_cancels_with_a_reason_that_goes_into_the_audit_trail(client, writer, seeded, backend):
    request_id = seeded.ids["due-in-3"]
    html = client.get(f"/dashboard/requests/{request_id}").text
    response = client.post(f"/dashboard/requests/{request_id}/cancel",
                           data={"csrf_token": csrf_of(html), "reason": "withdrawn by the subject"},
                           follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"].endswith("?done=cancel")
    page = client.get(response.headers["location"]).text
    assert "The request was canceled." in page and "status-canceled" in page
    with session_scope(backend.settings.database) as session:
        event = session.scalars(select(AuditEvent).where(AuditEvent.request_id == request_id)
                                .order_by(AuditEvent.id.desc())).first()
        assert event.to_status == "canceled" and event.actor.startswith("dashboard:")
        assert event.detail == {"reason": "withdrawn by the subject"}


@pytest.mark.parametrize("data, headers, status", [
    ({"reason": "x"}, {}, 403),  # no CSRF token
    ({"reason": "x", "csrf_token": "forged"}, {}, 403),
    ({"reason": "  "}, {}, 422),  # the dashboard asks why
    ({"reason": "x"}, {"Origin": "https://evil.example"}, 403),
])
def test_cancel_refuses_forged_or_reasonless_forms_and_changes_nothing(client, writer, seeded, backend, data,
                                                                        headers, status):
    request_id = seeded.ids["due-in-3"]
    html = client.get(f"/dashboard/requests/{request_id}").text
    if "csrf_token" not in data:
        data = {**data, "csrf_token": csrf_of(html)} if status != 403 or headers else data
    response = client.post(f"/dashboard/requests/{request_id}/cancel", data=data, headers=headers)
    assert response.status_code == status and response.headers["content-type"].startswith("text/html")
    with session_scope(backend.settings.database) as session:
        assert session.get(DeletionRequest, request_id).status == RequestStatus.QUEUED


def test_a_finished_request_cannot_be_canceled(client, writer, seeded):
    request_id = seeded.ids["done"]
    html = client.get(f"/dashboard/requests/{request_id}").text
    assert "Cancel request" not in html
    response = client.post(f"/dashboard/requests/{request_id}/cancel", data={"csrf_token": csrf_of(html),
                                                                             "reason": "late"})
    assert response.status_code == 409


def test_a_writer_retries_a_failed_request(client, writer, seeded, backend, enqueued):
    request_id = seeded.ids["due-in-20"]
    with session_scope(backend.settings.database) as session:
        row = session.get(DeletionRequest, request_id)
        transition(session=session, request=row, to=RequestStatus.RUNNING, actor="worker:test")
        transition(session=session, request=row, to=RequestStatus.FAILED, actor="worker:test")
        row.metrics = {**completed_run_metrics(), "target_met": False}
    html = client.get(f"/dashboard/requests/{request_id}").text
    assert "Retry with a new seed" in html and "<dt>Target met</dt><dd>no</dd>" in html
    enqueued.clear()
    response = client.post(f"/dashboard/requests/{request_id}/retry", data={"csrf_token": csrf_of(html)})
    assert response.status_code == 200 and "queued again" in response.text
    assert "Target met" not in response.text and "No run has finished" in response.text
    assert enqueued == [request_id]
    with session_scope(backend.settings.database) as session:
        assert session.get(DeletionRequest, request_id).status == RequestStatus.QUEUED


def test_an_unknown_request_is_a_404_page(client, reader):
    response = client.get("/dashboard/requests/not-a-uuid")
    assert response.status_code == 404 and "no deletion request" in response.text


# --- models ---------------------------------------------------------------------------------------

def test_the_models_page_shows_the_version_chain_and_the_retain_accuracy_chart(client, reader, seeded):
    html = client.get("/dashboard/models").text
    v2 = re.search(r'<tr id="digits-v2">(.*?)</tr>', html, re.S).group(1)
    v1 = re.search(r'<tr id="digits-v1">(.*?)</tr>', html, re.S).group(1)
    assert "current" in v2 and "current" not in v1
    assert "abababababab…" in v2 and "120.6 KiB" in v2 and ">done</a> (3)" in v2
    assert html.index('id="digits-v2"') < html.index('id="digits-v1"')  # newest first
    retained_after = [acc - 1.5 for c, acc in PER_CLASS_BEFORE.items() if c != "3"]
    assert f"{sum(retained_after) / 9:.1f} %" in v2
    assert f"{sum(PER_CLASS_BEFORE.values()) / 10:.1f} %" in v1
    polyline = re.search(r'<polyline points="([^"]+)"', html).group(1)
    assert len(polyline.split()) == 2


def test_a_completed_requests_page_links_its_certificate_which_prints_and_downloads(client, reader, seeded):
    from service.certificates.verify import keys_by_kid, verify

    done, waiting = seeded.ids["done"], seeded.ids["due-in-20"]
    detail = client.get(f"/dashboard/requests/{done}").text
    assert "/certificate" in detail and "audit half, 360 images" in detail
    assert "36 images of the class: one is 2.8 points" in detail  # the figure's resolution beside it
    assert "Linear probe on its features" in detail and "71.2 %" in detail and "10-shot fine-tuning" in detail
    assert "18 unseen images, audit half; 95 % interval 48–87" in detail  # 18 images: a loose figure, said so
    # The head row was reset: the figures the gate judged, the trained network's, stand beside the served ones.
    assert detail.count("before its head row was reset") == 2 and "0.7 %" in detail and "2.8 %" in detail
    assert "/certificate" not in client.get(f"/dashboard/requests/{waiting}").text
    page = client.get(f"/dashboard/requests/{done}/certificate")
    assert page.status_code == 200 and "Deletion certificate" in page.text
    assert "The checkpoint (step 5) was chosen on the selection half (357 images)" in page.text
    assert "no checkpoint reached the stop rule's margin" in page.text
    assert "(95 %: 74–99)" in page.text and "(95 %: 48–87)" in page.text and "(95 %: 38–60)" in page.text
    # The gates it passed, and how the interval gates judge: a reader can redo the verdict from the page.
    assert "probe ≤ 75 %; probe and attack judged by the lower end of the 95% Wilson interval" in page.text
    assert "membership attack ≤" not in page.text  # a gate that was off
    assert re.search(r'mia</th><td>[^<]*</td><td>18</td>', page.text)  # the attack's images a side
    assert "@media print" in client.get("/dashboard/static/dashboard.css").text  # it prints as a document
    download = client.get(f"/dashboard/requests/{done}/certificate.jws")
    assert download.headers["content-type"] == "application/jose"
    assert download.text in page.text  # the page shows the very document it offers
    said = verify(download.text, keys_by_kid(client.get("/.well-known/jwks.json").text)).statements
    assert said["sub"] == done and said["evidence"]["evaluation"]["images"] == 360
    refused = client.get(f"/dashboard/requests/{waiting}/certificate")
    assert refused.status_code == 409 and "completed" in refused.text


def test_the_models_page_lists_consumers_and_marks_those_behind_current(client, admin, reader, seeded, backend):
    """Seeded: version 2 is current. A consumer on current is fine, one on version 1 is one version
    behind (amber), one that acknowledged nothing is red."""
    assert "No consumer registered" in client.get("/dashboard/models").text
    with session_scope(backend.settings.database) as session:
        create_key(session=session, name="inference", scopes=["models:read"])
    versions = {v["version"]: v["sha256"] for v in client.get("/models/digits/versions", headers=admin).json()["versions"]}
    for name, version in (("kiosk", 2), ("search-api", 1), ("batch-scoring", None)):
        assert client.post("/models/digits/consumers", headers=admin,
                           json={"name": name, "api_key": "inference"}).status_code == 201
        if version:
            assert client.put(f"/models/digits/consumers/{name}", headers=admin,
                              json={"version": version, "sha256": versions[version]}).status_code == 200
    html = client.get("/dashboard/models").text
    rows = {name: re.search(rf"<tr><td>{name}</td>.*?</tr>", html, re.S).group(0)
            for name in ("kiosk", "search-api", "batch-scoring")}
    assert "tone-ok" in rows["kiosk"] and "serves current" in rows["kiosk"]
    assert "tone-amber" in rows["search-api"] and "1 version behind" in rows["search-api"]
    assert "tone-red" in rows["batch-scoring"] and "nothing acknowledged" in rows["batch-scoring"]


# --- webhooks -------------------------------------------------------------------------------------

def test_the_webhooks_page_shows_each_delivery_and_redelivers_one_with_its_own_id(client, backend, admin, seeded):
    """Its scope is the webhooks API's: a reader of requests and models sees neither the link nor the page."""
    reader = make_key(backend.settings, "requests:read", "models:read")
    assert log_in(client, reader).status_code == 303
    assert 'href="/dashboard/webhooks"' not in client.get("/dashboard/requests").text
    assert client.get("/dashboard/webhooks").status_code == 403

    with session_scope(backend.settings.database) as session:  # nobody listens on port 9
        webhook_id = webhooks.register(session=session, url="http://127.0.0.1:9/hooks", allowed_hosts=["127.0.0.1"],
                                       events=["deletion_request.canceled"], actor="test").id
    assert client.post(f"/deletion-requests/{seeded.ids['due-in-20']}/cancel", headers=admin).status_code == 200
    relay = settings_from({**backend.env, "LETHE_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1"})
    deliver_due(relay)  # refused: retried later
    with session_scope(backend.settings.database) as session:  # ... until its retry window is over
        session.execute(update(WebhookDelivery).values(created_at=utcnow() - timedelta(days=2), next_attempt_at=utcnow()))
    deliver_due(relay)
    manager = make_key(backend.settings, "requests:read", "webhooks:write")
    assert log_in(client, manager).status_code == 303
    page = client.get("/dashboard/webhooks")
    assert page.status_code == 200 and 'href="/dashboard/webhooks"' in page.text
    with session_scope(backend.settings.database) as session:
        delivery = session.scalar(select(WebhookDelivery))
        delivery_id, message_id = delivery.id, delivery.message_id
    row = re.search(rf'<tr id="delivery-{delivery_id}">(.*?)</tr>', page.text, re.S).group(1)
    assert "deletion_request.canceled" in row and message_id in row and ">failed<" in row
    assert "Connection refused" in row and "<td>2</td>" in row and "Redeliver" in row  # two attempts
    form = f"/dashboard/webhooks/{webhook_id}/deliveries/{delivery_id}/redeliver"
    assert client.post(form, data={"csrf_token": "forged"}, follow_redirects=False).status_code == 403
    done = client.post(form, data={"csrf_token": csrf_of(page.text)}, follow_redirects=False)
    assert done.status_code == 303 and "done=redeliver" in done.headers["location"]
    with session_scope(backend.settings.database) as session:
        again = session.get(WebhookDelivery, delivery_id)
        assert (again.status, again.message_id) == ("pending", message_id)  # the same webhook-id: receivers de-duplicate
