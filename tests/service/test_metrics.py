"""GET /metrics: the service's state read from the database at scrape time, and this process's HTTP traffic."""

from __future__ import annotations

from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.config import Settings
from service.db import session_scope
from service.deletion_requests.models import DeletionRequest, RequestStatus
from service.deletion_requests.transitions import transition
from tests.service.dashboard.seed import seed


def scrape(client: TestClient) -> dict[str, dict[tuple, float]]:
    """Samples by name, then by their labels (sorted pairs, ``le`` included)."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def fail_after_a_run(settings: Settings, request_id: str, seconds: float) -> None:
    """Record a run that failed after ``seconds``, as the worker records one."""
    with session_scope(settings.database) as session:
        row = session.get(DeletionRequest, request_id)
        transition(session=session, request=row, to=RequestStatus.RUNNING, actor="worker:test")
        row.started_at -= timedelta(seconds=seconds)
        transition(session=session, request=row, to=RequestStatus.FAILED, actor="worker:test")


@pytest.fixture
def seeded_states(client, admin, digits, digits_model, backend):
    """Queued: due in 3 days (at risk) and overdue; completed after a 90 s run; failed after a run of almost 2 h."""
    seeded = seed(client, admin, digits, digits_model, backend.settings, run_seconds=90)
    fail_after_a_run(backend.settings, seeded.ids["due-in-20"], 7000)
    return seeded


def test_requests_are_counted_by_status_with_every_status_present(client, seeded_states):
    by_status = {dict(labels)["status"]: value for labels, value in scrape(client)["lethe_deletion_requests"].items()}
    assert by_status == {"received": 0, "queued": 2, "running": 0, "completed": 0, "propagated": 1, "failed": 1,
                         "rejected": 0, "canceled": 0}


def test_at_risk_overdue_and_pending_work_follow_the_dashboards_rule(client, seeded_states):
    samples = scrape(client)
    assert samples["lethe_deletion_requests_at_risk"][()] == 1  # due in 3 days of 30
    assert samples["lethe_deletion_requests_overdue"][()] == 1
    assert samples["lethe_pending_requests"][()] == 2
    assert samples["lethe_unpropagated_requests"][()] == 0  # the seeded one propagated at once (no consumers)
    assert samples["lethe_models_with_queued_requests"][()] == 1
    assert samples["lethe_oldest_queued_request_age_seconds"][()] > 0
    assert samples["lethe_database_up"][()] == 1


def run_buckets(samples) -> dict[str, float]:
    return {dict(labels)["le"]: value for labels, value in samples["lethe_run_duration_seconds_bucket"].items()}


def test_each_run_that_ends_is_observed_with_its_wall_time(client, seeded_states):
    samples = scrape(client)
    buckets = run_buckets(samples)
    assert samples["lethe_run_duration_seconds_count"][()] == 2
    assert samples["lethe_run_duration_seconds_sum"][()] == pytest.approx(7090, abs=1)
    assert (buckets["60.0"], buckets["120.0"], buckets["3600.0"], buckets["7200.0"], buckets["+Inf"]) == (0, 1, 1, 2, 2)


def test_a_retried_request_counts_every_run_and_a_counter_never_goes_down(client, admin, seeded_states, backend):
    retried = seeded_states.ids["due-in-20"]  # failed after 7000 s
    assert client.post(f"/deletion-requests/{retried}/retry", headers=admin).status_code == 200
    fail_after_a_run(backend.settings, retried, 20)
    samples = scrape(client)
    assert samples["lethe_run_duration_seconds_count"][()] == 3
    assert samples["lethe_run_duration_seconds_sum"][()] == pytest.approx(7110, abs=1)
    assert run_buckets(samples)["30.0"] == 1


def test_runs_that_end_otherwise_are_not_observed(client, admin, seeded_states, backend):
    """A run canceled or re-queued (its lease lost) has no outcome: it is not a run duration."""
    with session_scope(backend.settings.database) as session:
        row = session.get(DeletionRequest, seeded_states.ids["due-in-3"])
        transition(session=session, request=row, to=RequestStatus.RUNNING, actor="worker:test")
        transition(session=session, request=row, to=RequestStatus.QUEUED, actor="sweep")
    assert scrape(client)["lethe_run_duration_seconds_count"][()] == 2


def test_each_model_reports_its_current_version(client, seeded_states):
    assert scrape(client)["lethe_model_current_version"] == {(("model", "digits"),): 2}


def test_an_empty_database_reports_zeros_not_missing_series(client):
    samples = scrape(client)
    assert set(dict(labels)["status"] for labels in samples["lethe_deletion_requests"]) == {s.value for s in RequestStatus}
    assert sum(samples["lethe_deletion_requests"].values()) == 0
    assert samples["lethe_run_duration_seconds_count"][()] == 0
    assert samples["lethe_deletion_requests_overdue"][()] == 0


def test_every_replica_reports_the_same_state_and_only_its_own_traffic(client, seeded_states, backend):
    for _ in range(3):
        client.get("/healthz")
    with TestClient(create_app(backend.settings, enqueue=lambda _id: None)) as replica:
        mine, theirs = scrape(client), scrape(replica)
    assert mine["lethe_deletion_requests"] == theirs["lethe_deletion_requests"]
    assert mine["lethe_deletion_requests_overdue"] == theirs["lethe_deletion_requests_overdue"]
    healthz = (("method", "GET"), ("route", "/healthz"), ("status", "200"))
    assert mine["lethe_http_requests_total"][healthz] == 3
    assert healthz not in theirs.get("lethe_http_requests_total", {})


def test_http_requests_are_labelled_by_route_template_not_raw_path(client, admin, seeded_states):
    for request_id in seeded_states.ids.values():
        assert client.get(f"/deletion-requests/{request_id}", headers=admin).status_code == 200
    assert client.get("/deletion-requests/00000000-0000-0000-0000-000000000000", headers=admin).status_code == 404
    assert client.get("/no/such/page").status_code == 404
    samples = scrape(client)
    requests = {tuple(v for _, v in labels): value for labels, value in samples["lethe_http_requests_total"].items()}
    assert requests[("GET", "/deletion-requests/{request_id}", "200")] == 4
    assert requests[("GET", "/deletion-requests/{request_id}", "404")] == 1
    assert requests[("GET", "(unmatched)", "404")] == 1
    assert not any(request_id in route for _, route, _ in requests for request_id in seeded_states.ids.values())
    latency = samples["lethe_http_request_duration_seconds_count"]
    assert latency[(("method", "GET"), ("route", "/deletion-requests/{request_id}"))] == 5


def test_metrics_need_no_key(client):
    assert client.get("/metrics").status_code == 200


def test_an_unreachable_database_is_reported_not_a_failed_scrape(tmp_path):
    settings = Settings(home=tmp_path, database_url="postgresql+psycopg://postgres@127.0.0.1:9/none")
    with TestClient(create_app(settings, enqueue=lambda _id: None)) as client:
        samples = scrape(client)
    assert samples["lethe_database_up"][()] == 0
    assert "lethe_deletion_requests" not in samples
