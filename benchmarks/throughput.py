"""Throughput with real workers: a burst of requests over many small models, drained by 1, 2 or 4 workers.

    .venv/bin/python benchmarks/throughput.py                                  # 20 models, 400 requests, 1 2 4
    .venv/bin/python benchmarks/throughput.py --workers 2 --models 5 --requests 50
    .venv/bin/python benchmarks/throughput.py --models 2 --requests 6 --workers 1 --out /tmp/t.json   # a look

For each worker count of ``--workers``, a throw-away Lethe on Postgres and Redis (a new database, a
flushed Redis db): migrated, an admin key, ``lethe serve`` and that many ``lethe worker`` processes
(one run at a time each, as one per GPU would be; torch's threads split the cores between them). The
digits ViT (``lethe demo``'s, trained once) is registered ``--models`` times under different names,
each with the held-out digits as its evaluation set, as a deployment registers its models. Then
``--requests`` deletion requests arrive at once (``--clients`` concurrent senders): model *m* gets
every ``--models``-th request, naming the ``--classes-per-model`` digits that model is asked to forget
in turn (the digits have 10 classes, so several requests name one class, as several data subjects
of one class would). By default one class a model: the digits ViT cannot lose more than one or two
of its ten classes within the publish gate's 5-point Acc_r budget (four at once cost it 11-12
points), and a burst of requests the gate refuses measures the gate, not the pipeline: a batch that
misses it is split into runs of one request each (``--classes-per-model 4`` shows that). Until every
request settled, the database is polled (not the API: polling is CPU
the runs would not get).

Reported per worker count, from the requests' own timestamps and the workers' "run finished" log
lines: requests per hour (settled requests / seconds from the first POST to the last settled), runs
and the coalescing factor (requests per run), the longest wait of any request (POST to settled) and
the longest queue wait (POST to its run's start), and fairness: how many runs started for a model
that had had one already while another model with waiting requests had had none (0: every model's
first run before any model's second), and the latest first run of any model. Figures go to
``results/throughput.json``; ``benchmarks/README.md`` extrapolates from them to a larger deployment.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.api_load import (POSTGRES_ADMIN, Database, LoadError, flush_redis, free_port,  # noqa: E402
                                 migrated_with_admin_key, start, stop)
from benchmarks.cli import count, database_url, entry_point, output_path, seconds, writable_folder, write_json  # noqa: E402
from benchmarks.request_latency import json_lines, register  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
OPEN = ("received", "queued", "running")


def build_model(folder: Path) -> tuple[Path, Path, Path]:
    """The demo's digits data, its ViT package and its held-out set (built once, in seconds)."""
    from service.demo import build_demo_model

    data, package, held_out = build_demo_model(folder)
    return data.train.resolve(), package.resolve(), held_out.resolve()  # as the data-root check sees them


def plan_requests(models: int, requests: int, classes_per_model: int) -> list[dict[str, Any]]:
    """Request n goes to model n % models; each model's requests cycle through its classes."""
    plan = []
    for n in range(requests):
        model, k = n % models, n // models
        digit = (model + k % classes_per_model) % 10  # models forget different digits
        plan.append({"external_id": f"burst-{n}", "model": f"digits-{model:02d}", "forget_class": str(digit)})
    return plan


def send_burst(api: str, auth: dict[str, str], plan: list[dict[str, Any]], train: Path, clients: int) -> float:
    """Every request of ``plan`` at once from ``clients`` senders; seconds the burst took."""
    import httpx

    def send(request: dict[str, Any]) -> None:
        body = {**request, "forget_set": {"uri": (train / request["forget_class"]).as_uri()}}
        response = http.post(f"{api}/deletion-requests", headers=auth, json=body, timeout=60.0)
        if response.status_code != 202:
            raise LoadError(f"POST /deletion-requests: {response.status_code} {response.text[:200]}")

    started = time.monotonic()
    with httpx.Client() as http, ThreadPoolExecutor(clients) as pool:
        list(pool.map(send, plan))
    return time.monotonic() - started


def wait_drained(url: str, workers: list[subprocess.Popen], timeout: float, every: float = 2.0) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if any(w.poll() is not None for w in workers):
                raise LoadError("a worker exited during the burst")
            with engine.connect() as c:
                left = c.execute(text(f"SELECT count(*) FROM deletion_requests WHERE status IN {OPEN}")).scalar_one()
            if left == 0:
                return
            time.sleep(every)
    finally:
        engine.dispose()
    raise LoadError(f"requests still open after {timeout:.0f} s")


def request_rows(url: str) -> list[dict[str, Any]]:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.connect() as c:
            return [dict(r._mapping) for r in c.execute(text(
                "SELECT r.id, m.name AS model, r.status, r.created_at, r.started_at, r.finished_at "
                "FROM deletion_requests r JOIN registered_models m ON m.id = r.model_id"))]
    finally:
        engine.dispose()


def run_lines(logs: list[Path]) -> list[dict[str, Any]]:
    """Every run's last line (finished, failed, canceled, timed out) from the workers' JSON logs."""
    runs = []
    for log in logs:
        for entry in json_lines(log):
            if entry.get("outcome"):
                ended = datetime.fromisoformat(entry["timestamp"])
                runs.append({"model": entry["model"], "requests": len(entry["deletion_requests"]),
                             "outcome": entry["outcome"], "seconds": entry["seconds"],
                             "started": ended.timestamp() - entry["seconds"], "ended": ended.timestamp(),
                             "worker": entry["worker"]})
    return sorted(runs, key=lambda r: r["started"])


def fairness(runs: list[dict[str, Any]], requests: list[dict[str, Any]], t0: float) -> dict[str, Any]:
    """Runs that started for a model already served while another model still waited for its first."""
    first_run = {}
    for run in runs:
        first_run.setdefault(run["model"], run["started"])
    waiting_models = {r["model"] for r in requests}  # every model had requests waiting from the burst on
    unfair = sum(1 for run in runs if run["started"] > first_run[run["model"]]
                 and any(first_run.get(m, float("inf")) > run["started"] for m in waiting_models))
    latest_first = max(first_run.values(), default=t0) - t0
    return {"runs_before_every_models_first": unfair, "latest_first_run_seconds": round(latest_first, 1),
            "models_served": len(first_run), "models": len(waiting_models)}


def measure(args: argparse.Namespace, workers: int, inputs: tuple[Path, Path, Path]) -> dict[str, Any]:
    train, package, held_out = inputs
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ExitStack() as stack:
        home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"lethe-throughput-{workers}-")))
        database = stack.enter_context(Database(args.postgres))
        redis_url = f"{args.redis.rstrip('/')}/{args.redis_db}"
        flush_redis(redis_url)
        stack.callback(flush_redis, redis_url)
        env = {**os.environ, "LETHE_HOME": str(home / "lethe"), "LETHE_DATA_ROOTS": f"{train},{held_out}",
               "LETHE_DATABASE_URL": database.url, "LETHE_BROKER_URL": redis_url, "LETHE_LOG_FORMAT": "json",
               "LETHE_LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
        auth = migrated_with_admin_key(env, REPO, "throughput")
        lethe = [sys.executable, "-m", "service.cli"]
        port = free_port()
        api = f"http://127.0.0.1:{port}"
        stack.callback(stop, start(lethe + ["serve", "--port", str(port)], env, home / "api.log", f"{api}/healthz"))
        for m in range(args.models):
            register(api, auth, package, held_out, name=f"digits-{m:02d}")
        logs, processes = [], []
        for w in range(workers):
            logs.append(home / f"worker-{w}.log")
            (home / f"tmp-{w}").mkdir()
            log = stack.enter_context(open(logs[-1], "ab"))
            process = subprocess.Popen(lethe + ["worker", "--loglevel", "INFO"], env={**env, "TMPDIR": str(home / f"tmp-{w}")},
                                       cwd=REPO, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
            stack.callback(stop, process)
            processes.append(process)
        wait_ready(logs, processes)
        plan = plan_requests(args.models, args.requests, args.classes_per_model)
        t0 = time.time()
        burst_seconds = send_burst(api, auth, plan, train, args.clients)
        wait_drained(database.url, processes, args.timeout)
        rows = request_rows(database.url)
        runs = run_lines(logs)
    if not any(r["finished_at"] for r in rows):
        raise LoadError("no request settled")  # wait_drained returned without any: nothing to measure
    settled = max(r["finished_at"].timestamp() for r in rows if r["finished_at"]) - t0
    trained = [r for r in runs if r["outcome"] == "finished"]
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    waits = [r["finished_at"].timestamp() - r["created_at"].timestamp() for r in rows if r["finished_at"]]
    queue_waits = [r["started_at"].timestamp() - r["created_at"].timestamp() for r in rows if r["started_at"]]
    return {
        "workers": workers, "torch_threads_per_worker": threads, "requests": len(rows), "statuses": statuses,
        "burst_seconds": round(burst_seconds, 2), "drained_seconds": round(settled, 1),
        "requests_per_hour": round(len(rows) / settled * 3600), "runs": len(runs), "runs_finished": len(trained),
        # A run's batch, retries included (a failed batch's requests run again one at a time) ...
        "requests_per_run": round(sum(r["requests"] for r in runs) / max(1, len(runs)), 2),
        # ... and the coalescing the burst got: each request once.
        "distinct_requests_per_run": round(len(rows) / max(1, len(runs)), 2),
        "run_seconds_mean": round(sum(r["seconds"] for r in trained) / max(1, len(trained)), 2),
        "run_seconds_total": round(sum(r["seconds"] for r in runs), 1),
        "longest_wait_seconds": round(max(waits, default=0.0), 1),
        "longest_queue_wait_seconds": round(max(queue_waits, default=0.0), 1),
        **fairness(runs, rows, t0),
    }


def wait_ready(logs: list[Path], processes: list[subprocess.Popen], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in processes):
            raise LoadError(f"a worker exited at start: {logs[0].read_text()[-500:]}")
        if all("ready." in log.read_text() for log in logs):
            return
        time.sleep(0.5)
    raise LoadError("the workers did not start within 120 s")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=count(1), nargs="+", default=[1, 2, 4], help="worker counts (default: 1 2 4)")
    parser.add_argument("--models", type=count(1), default=20)
    parser.add_argument("--requests", type=count(1), default=400)
    parser.add_argument("--classes-per-model", type=int, default=1,
                        help="digits each model is asked to forget (default 1: see the docstring)")
    parser.add_argument("--clients", type=count(1), default=16, help="concurrent senders of the burst")
    parser.add_argument("--timeout", type=seconds, default=3600.0, help="seconds a burst may take to drain")
    parser.add_argument("--postgres", type=database_url, default=POSTGRES_ADMIN)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379")
    # Not 13-15: the test suite's dbs (tests/service_fixtures.py); not request_latency's 11.
    parser.add_argument("--redis-db", type=count(0), default=12, help="the Redis database to use and flush (default: 12)")
    parser.add_argument("--cache", type=writable_folder, default=Path(tempfile.gettempdir()) / "lethe-throughput-model",
                        help="where the digits data and model are built once")
    parser.add_argument("--out", type=output_path, default=RESULTS / "throughput.json")
    args = parser.parse_args(argv)
    if args.requests < args.models:
        parser.error("give at least a request per model (--requests >= --models)")
    if not 1 <= args.classes_per_model <= 9:
        parser.error("--classes-per-model is 1 to 9: a digits model must keep a class to predict")
    return args


def check_backends(args: argparse.Namespace) -> None:
    """Postgres and Redis answer: found before the model is built (minutes on a busy machine)."""
    with Database(args.postgres):
        pass
    flush_redis(f"{args.redis.rstrip('/')}/{args.redis_db}")


@entry_point("throughput")  # a stopped benchmark still stops its servers and drops its databases
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_backends(args)
        inputs = build_model(args.cache)
        figures = []
        for workers in args.workers:
            figures.append(measure(args, workers, inputs))
            print(json.dumps(figures[-1]), flush=True)
    except LoadError as exc:
        print(f"throughput: {exc}", file=sys.stderr)
        return 2
    out = {"generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": {"platform": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
           "settings": {"models": args.models, "requests": args.requests, "classes_per_model": args.classes_per_model,
                        "clients": args.clients},
           "figures": figures}
    write_json(args.out, out, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
