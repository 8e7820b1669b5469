"""Webhooks to compliance tools: an event enters the outbox in the transaction of the change it
announces, is signed as Standard Webhooks says, retried until the receiver answers 2xx (same
webhook-id each time), and only ever sent to hosts the operator allowed (embedded default and
Postgres; a real HTTP receiver on 127.0.0.1). The relay in a real worker's sweeper, with real
consumers, is tests/service/consumers/test_end_to_end.py."""

from __future__ import annotations

import json
import socket
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import select, update
from standardwebhooks.webhooks import Webhook as Verifier, WebhookVerificationError

from service.db import session_scope, utcnow
from service.deletion_requests.models import DeletionRequest, RequestStatus as S
from service.deletion_requests.transitions import transition
from service.webhooks.delivery import deliver_due
from service.webhooks.models import WebhookDelivery
from service.webhooks.targets import TargetRefused, check_target
from tests.service_fixtures import make_key, register_digits, request_body, settings_from, with_env


class Receiver:
    """An HTTP server on 127.0.0.1 that records each POST and answers from a script of status codes."""

    def __init__(self, answers: list[int] | None = None) -> None:
        self.answers, self.received = list(answers or []), []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (the stdlib's name)
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.received.append({"headers": {k.lower(): v for k, v in self.headers.items()},
                                          "body": body.decode()})
                code = receiver.answers.pop(0) if receiver.answers else 200
                self.send_response(code)
                if code in (301, 302, 307):
                    self.send_header("location", "http://169.254.169.254/latest/meta-data/")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/lethe"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def receiver():
    server = Receiver()
    yield server
    server.close()


@pytest.fixture
def backend(backend):
    """Each backend with 127.0.0.1 explicitly allowed as a webhook target (the tests' receiver)."""
    return with_env(backend, LETHE_WEBHOOK_ALLOWED_HOSTS="127.0.0.1")


@pytest.fixture
def allowed(backend, client):
    return backend.settings, client


def subscribe(client, admin, url: str, events: list[str]) -> dict:
    response = client.post("/webhooks", headers=admin, json={"url": url, "events": events})
    assert response.status_code == 201, response.text
    return response.json()


def deliveries(settings) -> list[WebhookDelivery]:
    with session_scope(settings.database) as session:
        return list(session.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id)))


def test_a_status_change_is_delivered_signed_and_without_personal_data(backend, allowed, admin, receiver, digits,
                                                                        digits_model):
    settings, client = allowed
    hook = subscribe(client, admin, receiver.url, ["deletion_request.queued", "deletion_request.canceled"])
    assert hook["secret"].startswith("whsec_") and "secret" not in client.get("/webhooks", headers=admin).json()[0]
    assert register_digits(client, admin, digits_model).status_code == 201
    request_id = client.post("/deletion-requests", headers=admin, json=request_body(digits)).json()["id"]
    client.post(f"/deletion-requests/{request_id}/cancel", headers=admin, json={})
    assert [d.event_type for d in deliveries(settings)] == ["deletion_request.queued", "deletion_request.canceled"]
    assert deliver_due(settings) == {"delivered": 2, "retrying": 0, "failed": 0}
    queued, canceled = receiver.received
    event = json.loads(queued["body"])
    assert event["type"] == "deletion_request.queued" and event["data"]["id"] == request_id
    assert event["data"]["external_id"] == "subject-1" and event["data"]["status"] == "queued"
    assert str(digits.train_class("3")) not in queued["body"] and "forget" not in queued["body"]
    Verifier(hook["secret"]).verify(queued["body"], queued["headers"])  # raises if the signature is wrong
    with pytest.raises(WebhookVerificationError):
        Verifier("whsec_" + "A" * 32).verify(queued["body"], queued["headers"])
    assert queued["headers"]["webhook-id"] != canceled["headers"]["webhook-id"]
    assert [d.status for d in deliveries(settings)] == ["delivered", "delivered"]


def test_a_change_that_rolls_back_leaves_no_event(backend, allowed, admin, receiver, digits, digits_model):
    settings, client = allowed
    subscribe(client, admin, receiver.url, ["deletion_request.canceled"])
    assert register_digits(client, admin, digits_model).status_code == 201
    request_id = client.post("/deletion-requests", headers=admin, json=request_body(digits)).json()["id"]
    with pytest.raises(RuntimeError), session_scope(settings.database) as session:
        transition(session=session, request=session.get(DeletionRequest, request_id), to=S.CANCELED, actor="test")
        raise RuntimeError("the transaction fails after the change")
    assert deliveries(settings) == []


def test_a_receiver_that_fails_three_times_gets_the_event_once_it_answers_with_the_same_webhook_id(
        backend, allowed, admin, digits, digits_model):
    settings, client = allowed
    flaky = Receiver([500, 500, 503])
    try:
        subscribe(client, admin, flaky.url, ["deletion_request.queued"])
        assert register_digits(client, admin, digits_model).status_code == 201
        client.post("/deletion-requests", headers=admin, json=request_body(digits))
        outcomes = []
        for _ in range(4):
            outcomes.append(deliver_due(settings))
            with session_scope(settings.database) as session:  # the backoff's wait, skipped
                session.execute(update(WebhookDelivery).values(next_attempt_at=WebhookDelivery.created_at))
        assert [o["retrying"] for o in outcomes] == [1, 1, 1, 0] and outcomes[-1]["delivered"] == 1
    finally:
        flaky.close()
    ids = {r["headers"]["webhook-id"] for r in flaky.received}
    assert len(flaky.received) == 4 and len(ids) == 1  # a receiver de-duplicating by webhook-id sees it once
    (delivery,) = deliveries(settings)
    assert (delivery.status, delivery.attempts, delivery.last_status_code) == ("delivered", 4, 200)
    assert delivery.last_latency_ms is not None
    log = client.get(f"/webhooks/{delivery.webhook_id}/deliveries", headers=admin).json()
    assert log[0]["status"] == "delivered" and log[0]["attempts"] == 4


def test_redirects_are_not_followed_and_a_delivery_fails_after_the_retry_window(backend, allowed, admin, digits,
                                                                               digits_model):
    settings, client = allowed
    redirecting = Receiver([302, 302])
    try:
        hook = subscribe(client, admin, redirecting.url, ["deletion_request.queued"])
        assert register_digits(client, admin, digits_model).status_code == 201
        client.post("/deletion-requests", headers=admin, json=request_body(digits))
        assert deliver_due(settings)["retrying"] == 1
        (delivery,) = deliveries(settings)
        assert (delivery.status, delivery.last_status_code) == ("pending", 302) and len(redirecting.received) == 1
        past = utcnow() - timedelta(hours=settings.webhook_retry_hours, minutes=1)
        with session_scope(settings.database) as session:  # a day later
            session.execute(update(WebhookDelivery).values(created_at=past, next_attempt_at=past))
        assert deliver_due(settings)["failed"] == 1
        assert deliveries(settings)[0].status == "failed"
        # ... and it can be sent again by hand, with the same webhook-id.
        redelivered = client.post(f"/webhooks/{hook['id']}/deliveries/{delivery.id}/redeliver", headers=admin)
        assert redelivered.status_code == 202 and redelivered.json()["status"] == "pending"
        assert deliver_due(settings)["delivered"] == 1
        assert redirecting.received[-1]["headers"]["webhook-id"] == redirecting.received[0]["headers"]["webhook-id"]
    finally:
        redirecting.close()


def test_a_deleted_webhook_gets_nothing_more(backend, allowed, admin, receiver, digits, digits_model):
    settings, client = allowed
    hook = subscribe(client, admin, receiver.url, ["deletion_request.queued"])
    assert register_digits(client, admin, digits_model).status_code == 201
    client.post("/deletion-requests", headers=admin, json=request_body(digits))
    assert client.delete(f"/webhooks/{hook['id']}", headers=admin).status_code == 204
    assert deliver_due(settings) == {"delivered": 0, "retrying": 0, "failed": 0} and receiver.received == []
    assert client.get(f"/webhooks/{hook['id']}", headers=admin).status_code == 404
    client.post("/deletion-requests", headers=admin, json=request_body(digits, external_id="subject-2"))
    assert len(deliveries(settings)) == 1  # no new outbox row for it


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)  # HTTP behaviour, the same on either backend
def test_targets_must_be_allowed_and_public_unless_listed(allowed, admin, monkeypatch):
    settings, client = allowed
    refused = client.post("/webhooks", headers=admin, json={"url": "https://hooks.example.com/x",
                                                            "events": ["deletion_request.completed"]})
    assert refused.status_code == 422 and refused.json()["code"] == "webhook_target_refused"

    def resolves_to(address):
        return lambda host, port, **kw: [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", resolves_to("10.0.0.5"))
    with pytest.raises(TargetRefused, match="private, loopback or reserved"):
        check_target("https://hooks.example.com/x", ["*.example.com"])
    assert check_target("https://hooks.example.com/x", ["*.example.com", "10.0.0.5"]).address == "10.0.0.5"
    monkeypatch.setattr(socket, "getaddrinfo", resolves_to("93.184.216.34"))
    assert check_target("https://hooks.example.com:8443/x", ["*.example.com"]).port == 8443
    for url in ("ftp://hooks.example.com/", "https://user:pw@hooks.example.com/", "https:///nohost"):
        with pytest.raises(TargetRefused):
            check_target(url, ["*.example.com"])


@pytest.mark.parametrize("body", [{"url": "http://127.0.0.1/x", "events": []},
                                  {"url": "http://127.0.0.1/x", "events": ["deletion_request.exploded"]},
                                  {"url": "http://127.0.0.1/x"}])
def test_a_bad_subscription_is_422_and_creates_nothing(allowed, admin, body):
    _settings, client = allowed
    assert client.post("/webhooks", headers=admin, json=body).status_code == 422
    assert client.get("/webhooks", headers=admin).json() == []


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)  # HTTP behaviour, the same on either backend
def test_webhooks_need_their_own_scope(backend, allowed):
    _settings, client = allowed
    reader = make_key(backend.settings, "requests:read", "requests:write")
    assert client.get("/webhooks", headers=reader).status_code == 403
    writer = make_key(backend.settings, "webhooks:write")
    assert client.get("/webhooks", headers=writer).status_code == 200


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)  # the relay's check, the same on either backend
def test_a_target_no_longer_allowed_is_refused_at_delivery_and_gets_nothing(backend, allowed, admin, receiver, digits,
                                                                            digits_model):
    """Checked again at every attempt: an operator who takes a host off the list stops its deliveries."""
    settings, client = allowed
    subscribe(client, admin, receiver.url, ["deletion_request.queued"])
    assert register_digits(client, admin, digits_model).status_code == 201
    client.post("/deletion-requests", headers=admin, json=request_body(digits))
    no_longer = settings_from({**backend.env, "LETHE_WEBHOOK_ALLOWED_HOSTS": ""})
    assert deliver_due(no_longer) == {"delivered": 0, "retrying": 0, "failed": 1}
    (delivery,) = deliveries(settings)
    assert delivery.status == "failed" and "LETHE_WEBHOOK_ALLOWED_HOSTS" in delivery.last_error and receiver.received == []
