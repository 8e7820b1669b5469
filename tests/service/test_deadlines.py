"""Deadlines in calendar time: a month is a calendar month, clamped to the month's end."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from service.deadlines import Period, at_risk_from


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=timezone.utc)


@pytest.mark.parametrize(("period", "received", "due"), [
    ("P1M", utc(2026, 1, 31, 10), utc(2026, 2, 28, 10)),  # no 31 February: the month's last day
    ("P1M", utc(2028, 1, 31, 10), utc(2028, 2, 29, 10)),  # a leap year
    ("P1M", utc(2026, 3, 15, 9, 30), utc(2026, 4, 15, 9, 30)),
    ("P3M", utc(2026, 11, 30), utc(2027, 2, 28)),
    ("P45D", utc(2026, 12, 20), utc(2027, 2, 3)),
    ("P1Y", utc(2028, 2, 29), utc(2029, 2, 28)),
])
def test_a_period_is_added_in_calendar_time(period, received, due):
    assert Period.parse(period).after(received) == due


def test_at_risk_when_a_quarter_of_the_window_is_left():
    received, due = utc(2026, 2, 1), utc(2026, 3, 1)  # 28 days
    assert at_risk_from(received, due) == utc(2026, 2, 22)


@pytest.mark.parametrize("text", ["", "P", "1M", "P1H", "PT1H", "P1M2Y", "P-1D", "P1.5M"])
def test_anything_but_a_period_of_whole_years_months_weeks_days_is_refused(text):
    with pytest.raises(ValueError, match="not an ISO 8601 period"):
        Period.parse(text)
