"""The database at a data protection office's size: tens of models, thousands of erasures a month.

    .venv/bin/python benchmarks/scale.py                                   # 100 models, 200,000 requests
    .venv/bin/python benchmarks/scale.py --models 5 --requests 2000 --samples 10 --out /tmp/scale.json

A new database on the Postgres server (``--postgres``), migrated with ``lethe db upgrade``, is seeded
directly (generated, not run: COPY) with ``--models`` models, ``--versions`` versions spread over them,
``--requests`` deletion requests in a realistic mix of statuses and deadlines (most finished and
propagated, some failed, rejected or canceled, a few queued, running, at risk or overdue) and each
request's audit events, an inference service per model one version behind (so completed requests
wait for it) and the run-duration counters the runs would have added. What a running deployment's
sweep has done already is seeded done: deadline flags written, and requests finished more than 91
days ago redacted (``LETHE_REDACT_AFTER_DAYS`` 90: the first sweep finds one day's backlog). The
tables are vacuumed and analysed, as autovacuum leaves them. The app then runs in this process (``create_app`` on that database, through
FastAPI's TestClient: the figures are the service's own, handler + database, without a network
hop) and each call is timed ``--samples`` times after a first call reported apart:

- ``POST /deletion-requests`` (new requests, a model drawn at random);
- ``GET /deletion-requests`` unfiltered, by each status, by model, and cursor paging 10 pages deep;
- the dashboard's requests page (counts + a page), a filtered one, and its CSV export of every
  request (seconds, rows, and the growth of this process's peak memory while it streams);
- ``/metrics``;
- one sweep (``worker.runs.sweep.sweep``), three times: the first redacts the backlog, the others
  are the steady state.

Every SQL statement a call issues is captured, and the slowest SELECT of each call is run again
under ``EXPLAIN (ANALYZE, BUFFERS)``: the plan (sequential scans, sorts) is in the output. Figures go to
``results/scale.json``. Targets (issue 17): every API and dashboard p99 <= 200 ms, the sweep <= 2 s,
the CSV export of 200,000 rows <= 30 s with flat memory.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.api_load import Database, LoadError, _percentile  # noqa: E402
from benchmarks.cli import count, database_url, entry_point, output_path, write_json  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
# The mix of a mature deployment: most requests long done, a small live tail.
STATUS_MIX = {"propagated": 0.80, "completed": 0.05, "failed": 0.04, "rejected": 0.03, "canceled": 0.02,
              "queued": 0.04, "running": 0.005, "received": 0.015}
EVENTS = {  # the audit events a request in each status has, in order
    "propagated": ["received", "queued", "training_started", "completed", "propagated"],
    "completed": ["received", "queued", "training_started", "completed"],
    "failed": ["received", "queued", "training_started", "failed"],
    "rejected": ["received", "queued", "rejected"],
    "canceled": ["received", "queued", "canceled"],
    "queued": ["received", "queued"],
    "running": ["received", "queued", "running"],
    "received": ["received"],
}
FINISHED = {"propagated", "completed", "failed", "rejected", "canceled"}
CLASSES = [f"class-{k}" for k in range(100)]  # a face model's people, say
REDACTED = "redacted"  # service.deletion_requests.personal_data.REDACTED
REDACT_AFTER_DAYS = 90  # LETHE_REDACT_AFTER_DAYS's default: older finished requests are seeded redacted,
BACKLOG_DAYS = 1  # but for the last day's worth: what the first sweep after a day's outage finds to redact
DEADLINE_OPEN = {"received", "queued", "running", "completed"}


# --- seeding -----------------------------------------------------------------------------------

def copy_rows(connection, table, rows: Iterator[dict[str, Any]]) -> int:
    """COPY ``rows`` (dicts by column name) into ``table`` (a SQLAlchemy Table); every column the
    rows leave out must be nullable, so that a schema change shows here as an error, not as rows
    the service would never write."""
    columns = [c.name for c in table.columns if not (c.primary_key and c.autoincrement is True and
                                                     str(c.type) == "INTEGER")]
    required = {c.name for c in table.columns if not c.nullable and c.name in columns}
    count = 0
    with connection.cursor() as cursor:
        with cursor.copy(f'COPY {table.name} ({", ".join(columns)}) FROM STDIN') as copy:
            for row in rows:
                missing = required - row.keys()
                if missing:
                    raise LoadError(f"{table.name}: the seed gives no value for {', '.join(sorted(missing))}")
                copy.write_row([_pg(row.get(name)) for name in columns])
                count += 1
    return count


def _pg(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (dict, list)) else value


def seed(url: str, models: int, versions: int, requests: int, rng: random.Random) -> dict[str, int]:
    import psycopg

    from service.db import Base
    import service.registry.models  # noqa: F401
    import service.consumers.models  # noqa: F401
    import service.deletion_requests.models  # noqa: F401  (registers the tables)

    tables = Base.metadata.tables
    now = datetime.now(timezone.utc)
    model_ids = [str(uuid.uuid4()) for _ in range(models)]
    per_model = [versions // models + (1 if i < versions % models else 0) for i in range(models)]
    version_ids = {m: [str(uuid.uuid4()) for _ in range(max(n, 1))] for m, n in zip(model_ids, per_model)}
    counts: dict[str, int] = {}
    with psycopg.connect(url.replace("+psycopg", "")) as connection:
        counts["registered_models"] = copy_rows(connection, tables["registered_models"], (
            {"id": m, "name": f"model-{i:03d}", "created_at": now - timedelta(days=400), "run_lease_token": 0}
            for i, m in enumerate(model_ids)))
        counts["model_versions"] = copy_rows(connection, tables["model_versions"], (
            {"id": v, "model_id": m, "version": j + 1, "sha256": hashlib.sha256(v.encode()).hexdigest(),
             "size": 22_000_000, "card": {"architecture": "vit_tiny_patch16_224", "classes": CLASSES},
             "classes_forgotten": [f"class-{k}" for k in range(j)], "created_at": now - timedelta(days=400 - j),
             "superseded_at": None if j == len(vs) - 1 else now - timedelta(days=399 - j),
             "disposed_at": None if j >= len(vs) - 2 else now - timedelta(days=390 - j)}
            for m, vs in version_ids.items() for j, v in enumerate(vs)))
        with connection.cursor() as cursor:
            cursor.executemany("UPDATE registered_models SET current_version_id = %s WHERE id = %s",
                               [(vs[-1], m) for m, vs in version_ids.items()])
        plan = _request_plan(requests, model_ids, version_ids, now, rng)
        counts["deletion_requests"] = copy_rows(connection, tables["deletion_requests"], (r for r, _ in plan))
        counts["audit_events"] = copy_rows(connection, tables["audit_events"], (
            {"request_id": r["id"], "at": at, "actor": "seed", "event": event, "from_status": None,
             "to_status": event if event in EVENTS else None, "detail": {}}
            for r, events in plan for event, at in events))
        # Each model's inference service, one version behind: its completed requests wait for it.
        consumers = {m: str(uuid.uuid4()) for m in model_ids}
        counts["model_consumers"] = copy_rows(connection, tables["model_consumers"], (
            {"id": c, "model_id": m, "name": "inference", "api_key_name": "inference",
             "created_at": now - timedelta(days=400)} for m, c in consumers.items()))
        counts["consumer_acknowledgements"] = copy_rows(connection, tables["consumer_acknowledgements"], (
            {"consumer_id": consumers[m], "version_id": vs[max(0, len(vs) - 2)], "version": max(1, len(vs) - 1),
             "sha256": "0" * 64, "at": now - timedelta(days=1), "by": "inference"} for m, vs in version_ids.items()))
        with connection.cursor() as cursor:  # the migration made every counter, at zero
            cursor.executemany("UPDATE run_duration_counters SET value = value + %s WHERE name = %s",
                               [(value, name) for name, value in sorted(_run_counters(r for r, _ in plan).items())])
        connection.commit()
    # What autovacuum does to a table this size: statistics, and the visibility map index-only scans use.
    with psycopg.connect(url.replace("+psycopg", ""), autocommit=True) as connection:
        connection.execute("VACUUM ANALYZE")
    return counts


def _run_counters(rows: Iterator[dict[str, Any]]) -> dict[str, float]:
    """The run-duration counters the seeded runs would have added (service.deletion_requests.run_durations)."""
    from service.deletion_requests.run_durations import increments

    totals: dict[str, float] = {}
    for r in rows:
        if r["status"] in ("completed", "propagated", "failed") and r["started_at"] and r["finished_at"]:
            for name, value in increments((r["finished_at"] - r["started_at"]).total_seconds()).items():
                totals[name] = totals.get(name, 0.0) + value
    return totals


def _request_plan(n: int, model_ids: list[str], version_ids: dict[str, list[str]], now: datetime,
                  rng: random.Random) -> list[tuple[dict[str, Any], list[tuple[str, datetime]]]]:
    statuses = list(STATUS_MIX)
    weights = list(STATUS_MIX.values())
    plan = []
    for i in range(n):
        status = rng.choices(statuses, weights)[0]
        model = rng.choice(model_ids)
        live = status not in FINISHED
        # Finished requests over the last 400 days; live ones received in the last 40 (some overdue).
        received = now - timedelta(days=rng.uniform(0, 40) if live else rng.uniform(2, 400))
        due = received + timedelta(days=30)
        finished = received + timedelta(hours=rng.uniform(0.1, 48)) if status in FINISHED else None
        row = {"id": str(uuid.uuid4()), "external_id": f"subject-{i}", "model_id": model,
               "forget_class": rng.choice(CLASSES), "forget_uri": f"s3://forget-sets/{i}/",
               "status": status, "received_at": received, "due_at": due, "at_risk_from": due - timedelta(days=7.5),
               "created_at": received, "updated_at": finished or received,
               "queued_at": received if status != "received" else None,
               "started_at": received + timedelta(minutes=5) if status in ("running", "completed", "propagated",
                                                                          "failed") else None,
               "finished_at": finished, "propagated_at": finished if status == "propagated" else None,
               "extended_days": 0, "body_sha256": hashlib.sha256(str(i).encode()).hexdigest(), "seed": 0,
               "attempts": 1 if status not in ("received", "queued") else 0, "cancel_requested": False,
               "run_alone": False, "row_version": 1, "created_by": "key:compliance",
               # Completed ones by the newest version, which the model's consumer does not serve yet.
               "fulfilled_version_id": version_ids[model][-1] if status == "completed" else
               rng.choice(version_ids[model]) if status == "propagated" else None,
               "metrics": {"steps": 18, "forget_acc_after": {"x": 0.0}} if status in ("completed", "propagated") else None,
               "error": "forget set unreadable" if status in ("failed", "rejected") else None}
        events = [(e, received + timedelta(minutes=k)) for k, e in enumerate(EVENTS[status])]
        if status in DEADLINE_OPEN:  # the flags the sweep wrote when they came due
            events += [(flag, at) for flag, at in (("at_risk", row["at_risk_from"]), ("overdue", due)) if at <= now]
        if finished is not None and finished <= now - timedelta(days=REDACT_AFTER_DAYS + BACKLOG_DAYS):
            # What the sweep has done by now to a request finished this long ago (service/redaction.py).
            row |= {"forget_class": REDACTED, "forget_uri": REDACTED, "redacted_at": finished + timedelta(days=90),
                    "subject_commitment": hashlib.sha256(row["id"].encode()).hexdigest()}
            events.append(("redacted", finished + timedelta(days=90)))
        plan.append((row, events))
    return plan


# --- measuring ---------------------------------------------------------------------------------

class StatementLog:
    """Every SQL statement the engine runs while ``capture`` is open, with its seconds."""

    def __init__(self, engine) -> None:
        from sqlalchemy import event

        self.statements: list[tuple[float, str, Any]] = []
        self.active = False
        event.listen(engine, "before_cursor_execute", self._before)
        event.listen(engine, "after_cursor_execute", self._after)

    def _before(self, conn, cursor, statement, parameters, context, executemany):
        conn.info.setdefault("started", []).append(time.perf_counter())

    def _after(self, conn, cursor, statement, parameters, context, executemany):
        started = conn.info["started"].pop()
        if self.active and not executemany:
            self.statements.append((time.perf_counter() - started, statement, parameters))

    @contextmanager
    def capture(self) -> Iterator[list[tuple[float, str, Any]]]:
        self.statements, self.active = [], True
        try:
            yield self.statements
        finally:
            self.active = False


def timed(call: Callable[[], Any], samples: int) -> dict[str, Any]:
    """``samples`` timed calls after a first one, reported apart (``first_ms``): the first reads the
    pages a query needs into Postgres's cache and this process's, once; the samples are the
    steady state."""
    started = time.perf_counter()
    call()
    first_ms = round((time.perf_counter() - started) * 1000, 1)
    seconds = []
    status = None
    for _ in range(samples):
        started = time.perf_counter()
        response = call()
        seconds.append(time.perf_counter() - started)
        status = getattr(response, "status_code", None)
    ordered = sorted(s * 1000 for s in seconds)
    return {"samples": samples, "p50_ms": round(_percentile(ordered, 50), 1), "p99_ms": round(_percentile(ordered, 99), 1),
            "max_ms": round(ordered[-1], 1), "first_ms": first_ms, "status": status}


def explain(engine, statement: str, parameters: Any) -> list[str]:
    """The statement's plan, executed (EXPLAIN ANALYZE), in a transaction rolled back afterwards."""
    raw = engine.raw_connection()
    try:
        with raw.cursor() as cursor:
            cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + statement, parameters)
            plan = [row[0] for row in cursor.fetchall()]
        raw.rollback()
        return plan
    finally:
        raw.close()


def rss_mib() -> float:
    """This process's resident memory now (Linux), not its lifetime peak: the seeding's peak would hide
    the export's."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(url: str, home: Path, samples: int, rng: random.Random, models: int, quick: bool = False) -> dict[str, Any]:
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.auth.service import create_key
    from service.config import Settings
    from service.db import engine_for, session_scope
    from worker.runs.sweep import sweep

    import logging

    logging.getLogger("lethe").setLevel(logging.ERROR)  # the sweep's line per overdue request is not the figure
    settings = Settings(database_url=url, home=home, data_roots=str(home))
    with session_scope(settings.database) as session:
        _row, key = create_key(session=session, name="scale", scopes=["admin"])
    auth = {"Authorization": f"Bearer {key}"}
    enqueued: list[str] = []
    engine = engine_for(settings.database)
    log = StatementLog(engine)
    figures: dict[str, Any] = {}
    with TestClient(create_app(settings, enqueue=enqueued.append)) as client:
        _log_in(client, key)
        posted = iter(range(10**9))

        def post():
            n = next(posted)
            return client.post("/deletion-requests", headers=auth, json={
                "external_id": f"scale-{n}", "model": f"model-{rng.randrange(models):03d}",
                "forget_class": "class-1", "forget_set": {"uri": f"file://{home}/forget/{n}/"}})

        def paged(depth: int = 10):
            cursor = None
            for _ in range(depth):
                response = client.get("/deletion-requests", headers=auth,
                                      params={"limit": 100, **({"cursor": cursor} if cursor else {})})
                cursor = response.json().get("next_cursor")
                if not cursor:
                    break
            return response

        calls: dict[str, Callable[[], Any]] = {
            "POST /deletion-requests": post,
            "GET /deletion-requests": lambda: client.get("/deletion-requests", headers=auth),
            **{f"GET /deletion-requests?status={s}": (lambda s=s: client.get("/deletion-requests", headers=auth,
                                                                              params={"status": s}))
               for s in STATUS_MIX},
            "GET /deletion-requests?model=": lambda: client.get("/deletion-requests", headers=auth,
                                                                params={"model": "model-007"}),
            "GET /deletion-requests, 10 pages by cursor": paged,
            "dashboard requests page": lambda: client.get("/dashboard/requests"),
            "dashboard requests page, overdue": lambda: client.get("/dashboard/requests", params={"overdue": "1"}),
            "dashboard requests page 50": lambda: client.get("/dashboard/requests", params={"page": 50}),
            "GET /metrics": lambda: client.get("/metrics"),
        }
        for name, call in calls.items():
            figures[name] = timed(call, samples)
            with log.capture() as statements:
                call()
            figures[name]["statements"] = len(statements)
            reads = [s for s in statements if s[1].lstrip().upper().startswith("SELECT")]  # EXPLAIN ANALYZE runs it
            if reads:
                slowest = max(reads, key=lambda s: s[0])
                figures[name]["slowest_statement_ms"] = round(slowest[0] * 1000, 1)
                figures[name]["plan"] = explain(engine, slowest[1], slowest[2])
            print(_line(name, figures[name]), flush=True)
        if quick:
            return figures
        before = highest = rss_mib()
        started = time.perf_counter()
        rows = 0
        with client.stream("GET", "/dashboard/requests.csv") as response:
            for _ in csv.reader(io.TextIOWrapper(_Chunks(response.iter_bytes()), encoding="utf-8", newline="")):
                rows += 1
                if rows % 5000 == 0:
                    highest = max(highest, rss_mib())
        figures["dashboard CSV export"] = {"seconds": round(time.perf_counter() - started, 2), "rows": rows - 1,
                                           "status": response.status_code,
                                           "rss_growth_mib": round(max(highest, rss_mib()) - before, 1)}
        print(f"dashboard CSV export: {figures['dashboard CSV export']}", flush=True)
    sweeps, counts = [], []
    for _ in range(3):
        started = time.perf_counter()
        counts.append({k: v for k, v in sweep(settings, enqueued.append).items() if v})
        sweeps.append(round(time.perf_counter() - started, 2))
    figures["sweep"] = {"seconds": sweeps, "counts": counts}
    print(f"sweep: {sweeps} s, {counts}", flush=True)
    return figures


class _Chunks(io.RawIOBase):
    """A byte iterator as a readable stream (for csv over a streamed response)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks, self.left = chunks, b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self.left:
            try:
                self.left = next(self.chunks)
            except StopIteration:
                return 0
        n = min(len(buffer), len(self.left))
        buffer[:n], self.left = self.left[:n], self.left[n:]
        return n


def _log_in(client, key: str) -> None:
    import re

    page = client.get("/dashboard/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    if not token:
        raise LoadError("the dashboard's login page has no CSRF token")
    done = client.post("/dashboard/login", data={"api_key": key, "csrf_token": token.group(1), "next": ""},
                       follow_redirects=False)
    if done.status_code != 303:
        raise LoadError(f"dashboard login: {done.status_code}")


def _line(name: str, r: dict[str, Any]) -> str:
    return (f"{name}: p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, max {r['max_ms']} ms, first {r['first_ms']} ms, "
            f"status {r['status']}, "
            f"{r['statements']} statements, slowest {r.get('slowest_statement_ms')} ms")


@entry_point("scale")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=count(1), default=100)
    parser.add_argument("--versions", type=count(1), default=1000)
    parser.add_argument("--requests", type=count(1), default=200_000)
    parser.add_argument("--samples", type=count(1), default=50, help="timed calls of each endpoint")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="the calls only: no CSV export, no sweeps")
    parser.add_argument("--postgres", type=database_url, default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--out", type=output_path, default=RESULTS / "scale.json")
    args = parser.parse_args(argv)
    if args.versions < args.models:
        parser.error("give at least a version per model (--versions >= --models)")
    rng = random.Random(args.seed)
    try:
        with Database(args.postgres) as database, tempfile.TemporaryDirectory(prefix="lethe-scale-") as home:
            env = {**os.environ, "LETHE_DATABASE_URL": database.url, "LETHE_HOME": home}
            done = subprocess.run([sys.executable, "-m", "service.cli", "db", "upgrade"], env=env, cwd=REPO,
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise LoadError(f"lethe db upgrade: {(done.stderr.strip().splitlines() or ['no output'])[-1]}")
            started = time.perf_counter()
            counts = seed(database.url, args.models, args.versions, args.requests, rng)
            seeding = round(time.perf_counter() - started, 1)
            print(f"seeded {counts} in {seeding} s", flush=True)
            figures = measure(database.url, Path(home), args.samples, rng, args.models, args.quick)
    except LoadError as exc:
        print(f"scale: {exc}", file=sys.stderr)
        return 2
    out = {"generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": {"platform": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
           "sizes": counts, "seeding_seconds": seeding, "figures": figures,
           "targets": {"p99_ms": 200, "sweep_seconds": 2, "csv_seconds": 30}}
    write_json(args.out, out, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
