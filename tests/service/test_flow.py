"""End to end through a real worker process: request -> run -> version 2 -> current."""

from service.deletion_requests.models import RequestStatus
from tests.service_fixtures import register_digits, request_body, wait_for


def test_a_request_is_fulfilled_by_a_worker_and_current_moves(client, admin, digits, digits_model, start_worker):
    assert register_digits(client, admin, digits_model).status_code == 201
    worker = start_worker()
    accepted = client.post("/deletion-requests", headers=admin, json=request_body(digits))
    assert accepted.status_code == 202
    url = accepted.headers["location"]

    def finished():
        body = client.get(url, headers=admin).json()
        return body if body["status"] not in ("queued", "running") else None

    body = wait_for(finished, timeout=180, message=f"the request to finish; worker log:\n{worker.output()[-3000:]}")
    assert body["status"] == RequestStatus.PROPAGATED, body
    assert body["fulfilled_version"] == 2
    assert [e["event"] for e in body["events"]][:3] == ["created", "status:queued", "status:running"]
    current = client.get("/models/current", headers=admin).json()
    assert current["version"] == 2 and current["classes_forgotten"] == ["3"]
    assert [r["external_id"] for r in current["deletion_requests"]] == ["subject-1"]
    assert body["metrics"]["forget_acc_after"]["3"] <= 1.0
    # The digits model's head rows are its classes' templates: the default run took the head-row setting.
    assert body["metrics"]["feature_term"]["applied"] is True and body["metrics"]["feature_term"]["prototypes"] == "head"
