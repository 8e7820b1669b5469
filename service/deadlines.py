"""Legal deadlines in the law's unit: ISO 8601 periods of calendar time (GDPR Art. 12(3): one month,
``P1M``; the CCPA: 45 days, ``P45D``), added with month arithmetic that clamps to the month's end
(31 January + P1M = 28 or 29 February), as a court counts them.

The parser takes the date part of ISO 8601 durations only (years, months, weeks, days): a legal
deadline has no hours. ``dateutil``'s ``relativedelta`` (already installed with Celery) does the
calendar arithmetic; the grammar is small enough that a regular expression states it exactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from dateutil.relativedelta import relativedelta

_PERIOD = re.compile(r"P(?:(?P<years>\d{1,3})Y)?(?:(?P<months>\d{1,4})M)?(?:(?P<weeks>\d{1,4})W)?(?:(?P<days>\d{1,5})D)?")
AT_RISK_FRACTION = 0.25  # a request is at risk when less than this share of its window is left


@dataclass(frozen=True)
class Period:
    years: int = 0
    months: int = 0
    days: int = 0

    @classmethod
    def parse(cls, text: str) -> Period:
        match = _PERIOD.fullmatch(text.strip().upper())
        if match is None or not any(match.groupdict().values()):
            raise ValueError(f"{text!r} is not an ISO 8601 period of years, months, weeks or days "
                             "(e.g. P1M for one month, P45D for 45 days)")
        parts = {k: int(v or 0) for k, v in match.groupdict().items()}
        period = cls(years=parts["years"], months=parts["months"], days=parts["weeks"] * 7 + parts["days"])
        if period == cls():
            raise ValueError(f"{text!r} is an empty period; a deadline must lie after the request")
        return period

    def after(self, start: datetime) -> datetime:
        return start + relativedelta(years=self.years, months=self.months, days=self.days)

    def __str__(self) -> str:
        return "P" + "".join(f"{n}{unit}" for n, unit in ((self.years, "Y"), (self.months, "M"), (self.days, "D"))
                             if n)


def at_risk_from(received_at: datetime, due_at: datetime) -> datetime:
    """When less than ``AT_RISK_FRACTION`` of the window from receipt to due date is left."""
    return due_at - (due_at - received_at) * AT_RISK_FRACTION
