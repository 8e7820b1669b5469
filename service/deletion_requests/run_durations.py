"""Run durations, as the counters of a Prometheus histogram kept in the database as runs end.

A run that ends (running -> completed or failed) adds its seconds here, in the transaction that
records its end (``transitions.transition``; written as that transaction commits, see ``observe``): a scrape then reads a few rows, however many runs there
were. Summing every finished request's timestamps at each scrape took 120-200 ms at 200,000 requests
(benchmarks/scale.py) and grew with every request. Being counters, they count every run: a request
that failed and ran again counts both runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import event, select
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


PENDING = "run_durations"  # session.info key: this transaction's runs, added when it commits


def observe(session: Session, seconds: float) -> None:
    """Add one run, when the session's transaction commits (with it, or not at all).

    The counters are shared by every run, so their rows are locked from the update to the commit:
    taken in the middle of a transaction, that lock joined cycles with request rows (a sweep that
    failed a dead run, then flagged a request a settling worker held, while the worker waited for the
    counters: a deadlock, found by an outside test). Taken last, just before the commit, a holder
    waits for nothing more, so it is in no cycle."""
    pending = session.info.setdefault(PENDING, {})
    for name, value in increments(seconds).items():
        pending[name] = pending.get(name, 0.0) + value


@event.listens_for(Session, "before_commit")
def _add_pending(session: Session) -> None:
    if session.in_nested_transaction():
        return  # a savepoint: the counters wait for the transaction itself
    pending = session.info.pop(PENDING, None)
    if not pending:
        return
    # One statement, rows in name order: concurrent commits lock them in one order.
    rows = [{"name": name, "value": value} for name, value in sorted(pending.items())]
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    statement = insert(RunDurationCounter).values(rows)
    session.execute(statement.on_conflict_do_update(
        index_elements=[RunDurationCounter.name], set_={"value": RunDurationCounter.value + statement.excluded.value}))


@event.listens_for(Session, "after_rollback")
def _drop_pending(session: Session) -> None:
    session.info.pop(PENDING, None)


@dataclass(frozen=True)
class RunDurations:
    count: int
    total_seconds: float
    cumulative: list[tuple[float, int]]  # (upper bound, runs at most that long), every bucket


def read(session: Session) -> RunDurations:
    values = dict(session.execute(select(RunDurationCounter.name, RunDurationCounter.value)).all())
    return RunDurations(int(values.get(COUNT, 0)), float(values.get(SUM, 0.0)),
                        [(b, int(values.get(bucket_name(b), 0))) for b in BUCKETS])
