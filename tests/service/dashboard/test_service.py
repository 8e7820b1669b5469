"""Dashboard logic without HTTP: deadline badges, the table's query, CSV cells, retain accuracy and its chart."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from service.dashboard.service import Badge, TableQuery, badge, csv_safe, retain_accuracy, retain_chart
from service.deletion_requests.models import DeletionRequest, RequestStatus
from service.deadlines import at_risk_from
from service.errors import InvalidInput
from service.registry.models import ModelVersion

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=timezone.utc)


def request_due_in(delta: timedelta, status: RequestStatus = RequestStatus.QUEUED) -> DeletionRequest:
    received = NOW + delta - timedelta(days=30)
    due_at = NOW + delta
    return DeletionRequest(status=status, received_at=received, due_at=due_at,
                           at_risk_from=at_risk_from(received, due_at))


@pytest.mark.parametrize("delta, text, tone", [
    (timedelta(days=20, hours=1), "20 days left", "ok"),
    (timedelta(days=7, hours=13), "7 days left", "ok"),  # exactly 25 % of 30 days is 7.5 days
    (timedelta(days=7, hours=11), "7 days left", "amber"),
    (timedelta(days=1, hours=2), "1 day left", "amber"),
    (timedelta(hours=5), "due today", "amber"),
    (-timedelta(hours=5), "1 day overdue", "red"),
    (-timedelta(days=3, hours=1), "3 days overdue", "red"),
])
def test_the_deadline_badge_counts_whole_days_and_turns_amber_then_red(delta, text, tone):
    assert badge(request_due_in(delta), NOW) == Badge(text, tone)


@pytest.mark.parametrize("status", [RequestStatus.PROPAGATED, RequestStatus.FAILED, RequestStatus.REJECTED,
                                    RequestStatus.CANCELED])
def test_finished_requests_have_no_badge_even_when_past_their_date(status):
    assert badge(request_due_in(-timedelta(days=2), status), NOW) is None


def test_a_completed_request_still_counts_its_deadline_until_every_consumer_serves_it():
    assert badge(request_due_in(-timedelta(days=2), RequestStatus.COMPLETED), NOW) == Badge("2 days overdue", "red")


def test_the_table_query_refuses_unknown_statuses_sorts_and_pages():
    for bad in ({"status": "lost"}, {"sort": "name"}, {"page": 0}):
        with pytest.raises(InvalidInput):
            TableQuery(**bad)


def test_table_links_keep_the_filters_and_leave_out_defaults():
    query = TableQuery(status="queued", overdue=True, page=3)
    assert query.params() == {"status": "queued", "overdue": "1", "page": "3"}
    assert query.params(page=None, sort="-due") == {"status": "queued", "overdue": "1", "sort": "-due"}
    assert TableQuery().params() == {}


@pytest.mark.parametrize("value, cell", [
    ("=1+1", "'=1+1"), ("+1", "'+1"), ("-x", "'-x"), ("@SUM(A1)", "'@SUM(A1)"), ("subject-1", "subject-1"),
    (-3, "-3"), (None, ""), (True, "True"), (NOW, "2026-11-29T12:00:00+00:00"),
])
def test_csv_cells_from_outside_never_become_formulas(value, cell):
    assert csv_safe(value) == cell


def test_retain_accuracy_averages_the_classes_a_version_still_predicts():
    per_class = {"a": 90.0, "b": 80.0, "c": 0.0, "d": None}
    first = ModelVersion(version=1, classes_forgotten=[], metrics={"per_class_accuracy": {"a": 92.0, "b": 84.0}})
    later = ModelVersion(version=2, classes_forgotten=["c"], metrics={"evaluation": {"per_class_after": per_class}})
    assert retain_accuracy(first) == 88.0
    assert retain_accuracy(later) == 85.0
    assert retain_accuracy(ModelVersion(version=2, classes_forgotten=[], metrics={"steps": 3})) is None
    assert retain_accuracy(ModelVersion(version=1, classes_forgotten=[], metrics=None)) is None


def test_the_chart_spans_the_data_and_places_versions_left_to_right():
    chart = retain_chart([(1, 96.0), (2, 95.0), (4, 93.0)], width=480, height=160)
    xs = [x for x, _, _, _ in chart.points]
    ys = [y for _, y, _, _ in chart.points]
    assert xs == sorted(xs) and xs[0] == 44 and xs[-1] == 480 - 16
    assert ys == sorted(ys)  # lower accuracy is drawn lower
    assert chart.low < 93.0 and chart.high > 96.0 and chart.high - chart.low >= 5
    assert all(12 <= y <= 160 - 28 for y in ys)
    single = retain_chart([(1, 50.0)])
    assert len(single.points) == 1 and single.low < 50.0 < single.high
    assert retain_chart([]) is None
