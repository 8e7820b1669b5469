"""Run durations, as the counters of a Prometheus histogram kept in the database as runs end.

A run that ends (running -> completed or failed) adds its seconds here, in the transaction that
records its end (``transitions.transition``): a scrape then reads a few rows, however many runs there
were. Summing every finished request's timestamps at each scrape took 120-200 ms at 200,000 requests
(benchmarks/scale.py) and grew with every request. Being counters, they count every run: a request
that failed and ran again counts both runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from service.deletion_requests.models import RunDurationCounter

# A run takes seconds on a small model, hours on a large one or a slow machine. Changing these needs
# a migration that recounts (migrations/versions/0014_run_duration_counters.py counted these).
BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400)
COUNT, SUM = "count", "sum"


def bucket_name(bound: float) -> str:
    return f"le:{float(bound)}"


def increments(seconds: float) -> dict[str, float]:
    """What one run of ``seconds`` adds to each counter (cumulative buckets, as Prometheus has them)."""
    seconds = max(0.0, seconds)  # a clock stepped back between start and end
    return {COUNT: 1.0, SUM: seconds, **{bucket_name(b): 1.0 for b in BUCKETS if seconds <= b}}


def observe(session: Session, seconds: float) -> None:
    """Add one run. One statement; rows in name order, so concurrent runs lock them in one order."""
    rows = [{"name": name, "value": value} for name, value in sorted(increments(seconds).items())]
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    statement = insert(RunDurationCounter).values(rows)
    session.execute(statement.on_conflict_do_update(
        index_elements=[RunDurationCounter.name], set_={"value": RunDurationCounter.value + statement.excluded.value}))


@dataclass(frozen=True)
class RunDurations:
    count: int
    total_seconds: float
    cumulative: list[tuple[float, int]]  # (upper bound, runs at most that long), every bucket


def read(session: Session) -> RunDurations:
    values = dict(session.execute(select(RunDurationCounter.name, RunDurationCounter.value)).all())
    return RunDurations(int(values.get(COUNT, 0)), float(values.get(SUM, 0.0)),
                        [(b, int(values.get(bucket_name(b), 0))) for b in BUCKETS])
