"""One deletion request, POST to published, and where its seconds go.

    .venv/bin/python benchmarks/request_latency.py                        # CIFAR-10 reference model, both parts
    .venv/bin/python benchmarks/request_latency.py --part engine --threads 1
    .venv/bin/python benchmarks/request_latency.py --part service --backends embedded
    .venv/bin/python benchmarks/request_latency.py --model PKG --forget DIR --forget-class 3 --eval-set CSV

Two parts, each with and without a registered evaluation set (``--eval`` both|with|without):

- **service**: the real thing, as a user meets it. A throw-away Lethe on each backend of
  ``--backends`` (embedded: SQLite and Celery's SQL transport in a temporary home; postgres: a new
  database and a flushed Redis db), migrated, with an admin key; ``lethe serve`` and one ``lethe
  worker`` (JSON logs); the model registered through ``POST /models`` (with ``eval_set``); one
  ``POST /deletion-requests``, then polled until it settles. Reported: seconds from the POST to
  ``completed`` as the client saw it, and the run's phases as the worker timed them (its "run
  finished" log line: fetch version, check forget sets, engine / ..., write candidate, re-checks,
  store candidate, settle), each with its seconds and count.
- **engine**: the worker's own engine call (``worker.runs.train.run_config``, the same config) in
  this process, timed by phase: where a GPU or another CPU changes the figure.

The default inputs are the shared CIFAR-10 reference package (``../shared/models/cifar10-vit-d6``),
the first ``--forget-images`` (500) training images of ``airplane`` and ``--eval-per-class`` (100)
test images of every class as the evaluation set (1,000); ``--model``, ``--forget`` and
``--eval-set`` measure any package instead. Figures go to ``results/request_latency.json``.
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
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

from benchmarks.api_load import (Database, LoadError, flush_redis, free_port, migrated_with_admin_key,  # noqa: E402
                                 start, stop)
from benchmarks.cifar import Cifar10, DataError, write_manifest  # noqa: E402
from benchmarks.cli import count, database_url, entry_point, output_path, seconds, write_json  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
MODEL = "latency"
SETTLED = {"completed", "propagated", "failed", "rejected", "canceled"}


# --- inputs ------------------------------------------------------------------------------------

def cifar_inputs(args: argparse.Namespace) -> dict[str, Any]:
    """The reference package, a forget set of the class and a labelled evaluation manifest."""
    data = Cifar10.open(args.data)
    rows = [(p, c) for c in data.classes for p in data.images("test", c)[:args.eval_per_class]]
    return {"model": args.model, "forget": data.forget(args.forget_class, args.forget_images),
            "forget_class": args.forget_class,
            "eval_set": write_manifest(data.root / f"eval-{len(rows)}.csv", rows)}


def given_inputs(args: argparse.Namespace) -> dict[str, Any]:
    return {"model": args.model, "forget": args.forget, "forget_class": args.forget_class, "eval_set": args.eval_set}


# --- the engine alone --------------------------------------------------------------------------

def engine_part(inputs: dict[str, Any], with_eval: bool) -> dict[str, Any]:
    from service.config import Settings, get_unlearn_settings
    from worker.engine import ForgetSpec, UnlearnInputs, unlearn
    from worker.engine.timings import Timings
    from worker.engine.unlearn import forget_set_facts
    from worker.runs.train import run_config

    spec = ForgetSpec(inputs["forget_class"], str(inputs["forget"]))
    facts = forget_set_facts(str(inputs["model"]), (spec,), with_row_cosine=True)[spec.class_name]
    knobs = get_unlearn_settings().engine_settings(facts.distinct, facts.row_cosine)  # as the worker chooses
    config = run_config(Settings(), seed=0, knobs=knobs, with_eval_set=with_eval)
    timings = Timings()
    started = time.perf_counter()
    result = unlearn(UnlearnInputs(model=str(inputs["model"]),
                                   forget=(ForgetSpec(inputs["forget_class"], str(inputs["forget"])),),
                                   eval_source=str(inputs["eval_set"]) if with_eval else None), config, timings=timings)
    report = result.report
    evaluation = report.evaluation
    return {"seconds": round(time.perf_counter() - started, 2), "steps": report.steps, "steps_run": report.steps_run,
            "precision": report.precision, "device": report.device, "target_met": report.target_met,
            "acc_r_before": evaluation.acc_r_before if evaluation else None,
            "acc_r_after": evaluation.acc_r_after if evaluation else None,
            "acc_f_after": evaluation.acc_f_after if evaluation else None,
            "phases": timings.to_dict()}


# --- the service -------------------------------------------------------------------------------

def service_part(args: argparse.Namespace, inputs: dict[str, Any], backend: str, with_eval: bool) -> dict[str, Any]:
    import httpx

    with ExitStack() as stack:
        home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"lethe-latency-{backend}-")))
        roots = sorted({str(Path(inputs[k]).resolve().parent) for k in ("forget", "eval_set") if inputs[k] is not None})
        env = {**os.environ, "LETHE_HOME": str(home / "lethe"), "LETHE_DATA_ROOTS": ",".join(roots),
               "LETHE_LOG_FORMAT": "json", "LETHE_LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1"}
        if args.threads:
            env |= {"OMP_NUM_THREADS": str(args.threads)}  # torch in the worker takes its thread count from it
        if backend == "postgres":
            database = stack.enter_context(Database(args.postgres))
            redis_url = f"{args.redis.rstrip('/')}/{args.redis_db}"
            flush_redis(redis_url)
            stack.callback(flush_redis, redis_url)
            env |= {"LETHE_DATABASE_URL": database.url, "LETHE_BROKER_URL": redis_url}
        lethe = [sys.executable, "-m", "service.cli"]
        auth = migrated_with_admin_key(env, REPO, "latency")
        port = free_port()
        api = f"http://127.0.0.1:{port}"
        stack.callback(stop, start(lethe + ["serve", "--port", str(port)], env, home / "api.log", f"{api}/healthz"))
        worker_log = home / "worker.log"
        log = stack.enter_context(open(worker_log, "ab"))
        worker = subprocess.Popen(lethe + ["worker", "--loglevel", "INFO"], env=env, cwd=REPO, start_new_session=True,
                                  stdout=log, stderr=subprocess.STDOUT)
        stack.callback(stop, worker)
        register(api, auth, Path(inputs["model"]), Path(inputs["eval_set"]) if with_eval else None)
        body = {"external_id": f"latency-{backend}", "model": MODEL, "forget_class": inputs["forget_class"],
                "forget_set": {"uri": Path(inputs["forget"]).resolve().as_uri()}}
        posted = time.monotonic()
        response = httpx.post(f"{api}/deletion-requests", headers=auth, json=body, timeout=30.0)
        if response.status_code != 202:
            raise LoadError(f"POST /deletion-requests: {response.status_code} {response.text[:200]}")
        request = wait_settled(api, auth, response.json()["id"], args.timeout, worker, args.poll_seconds)
        seconds = round(time.monotonic() - posted, 2)
        if request["status"] not in ("completed", "propagated"):
            raise LoadError(f"the request ended {request['status']}: {request.get('error')}")
        run = run_finished(worker_log)
        metrics = request.get("metrics") or {}
        evaluation = metrics.get("evaluation") or {}
        return {"post_to_completed_seconds": seconds, "run_seconds": run.get("seconds"), "steps": metrics.get("steps"),
                "torch_threads": run.get("torch_threads"),
                "precision": metrics.get("precision"), "acc_r_before": evaluation.get("acc_r_before"),
                "acc_r_after": evaluation.get("acc_r_after"), "acc_f_after": evaluation.get("acc_f_after"),
                "phases": run.get("timings", {})}


def register(api: str, auth: dict[str, str], package: Path, eval_set: Path | None, name: str = MODEL) -> None:
    import httpx

    data = {"name": name, **({"eval_set": eval_set.resolve().as_uri()} if eval_set else {})}
    with open(package / "model.json", "rb") as card, open(package / "model.safetensors", "rb") as weights:
        response = httpx.post(f"{api}/models", headers=auth, data=data, timeout=300.0,
                              files={"card": ("model.json", card), "weights": ("model.safetensors", weights)})
    if response.status_code != 201:
        raise LoadError(f"registering {name}: {response.status_code} {response.text[:200]}")


def wait_settled(api: str, auth: dict[str, str], request_id: str, timeout: float, worker: subprocess.Popen,
                 every: float) -> dict[str, Any]:
    """The request once it left the queue and the run, polled ``every`` seconds (the figure's
    resolution; each poll is CPU the run does not get, on a 2-core machine)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise LoadError(f"the worker exited with {worker.returncode}")
        found = httpx.get(f"{api}/deletion-requests/{request_id}", headers=auth, timeout=30.0).json()
        if found["status"] in SETTLED:
            return found
        time.sleep(every)
    raise LoadError(f"the request did not settle within {timeout:.0f} s")


def run_finished(log: Path) -> dict[str, Any]:
    """The worker's last "run finished" line (JSON), which carries the run's phases (a checkout
    from before the runs timed themselves has none: its figure is the POST -> completed time alone)."""
    runs = [line for line in json_lines(log) if line.get("outcome") == "finished"]
    if not runs:
        raise LoadError(f"{log}: no 'run finished' line")
    return runs[-1]


def json_lines(log: Path) -> list[dict[str, Any]]:
    """The log's JSON objects; any other line (a library's own print, a traceback) is passed over."""
    found = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            found.append(value)
    return found


# --- the report --------------------------------------------------------------------------------

def phase_lines(phases: dict[str, dict[str, Any]]) -> list[str]:
    total = sum(p["seconds"] for p in phases.values()) or 1.0
    return [f"  {p['seconds']:8.2f} s {100 * p['seconds'] / total:5.1f} % x{p['count']:<4d} {name}"
            for name, p in phases.items()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("both", "engine", "service"), default="both")
    parser.add_argument("--eval", choices=("both", "with", "without"), default="both",
                        help="with and/or without a registered evaluation set")
    parser.add_argument("--backends", default="embedded,postgres", help="service part: embedded, postgres or both")
    parser.add_argument("--threads", type=count(0), default=0, help="torch threads (0: torch's default, one per core)")
    parser.add_argument("--data", type=Path, default=SHARED / "datasets" / "cifar10")
    parser.add_argument("--model", type=Path, default=SHARED / "models" / "cifar10-vit-d6")
    parser.add_argument("--forget", type=Path, default=None, help="a forget set (folder or manifest); default: "
                                                                  "the first --forget-images CIFAR-10 images of the class")
    parser.add_argument("--forget-class", default="airplane")
    parser.add_argument("--forget-images", type=count(1), default=500)
    parser.add_argument("--eval-set", type=Path, default=None, help="a labelled manifest; default: --eval-per-class "
                                                                    "CIFAR-10 test images of each class")
    parser.add_argument("--eval-per-class", type=count(1), default=100)
    parser.add_argument("--postgres", type=database_url, default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379")
    # Not 13-15: the test suite's dbs (tests/service_fixtures.py), flushed by both.
    parser.add_argument("--redis-db", type=count(0), default=11, help="the Redis db to use and flush (default: 11)")
    parser.add_argument("--timeout", type=seconds, default=1800.0, help="seconds a request may take to settle")
    parser.add_argument("--poll-seconds", type=seconds, default=1.0, help="how often the client asks (default: %(default)s)")
    parser.add_argument("--out", type=output_path, default=RESULTS / "request_latency.json")
    args = parser.parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not backends or any(b not in ("embedded", "postgres") for b in backends):
        parser.error("--backends takes embedded and/or postgres (comma-separated)")
    args.backends = list(dict.fromkeys(backends))  # each once: a second run would overwrite the first's figures
    if args.forget is None and args.eval_set is not None:
        parser.error("--eval-set measures a package of your own: give its --forget too")
    if args.forget is not None and args.eval_set is None and args.eval != "without":
        parser.error("with --forget, give --eval-set too (or --eval without)")
    return args


@entry_point("request_latency")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # first: a bad argument is refused in a second, before torch is imported
    from worker.engine import EngineError

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        inputs = given_inputs(args) if args.forget is not None else cifar_inputs(args)
    except DataError as exc:
        print(f"request_latency: {exc}", file=sys.stderr)
        return 2
    evals = {"both": (True, False), "with": (True,), "without": (False,)}[args.eval]
    figures: dict[str, Any] = {}
    try:
        for with_eval in evals:
            label = "with eval set" if with_eval else "without eval set"
            if args.part in ("both", "service"):
                for backend in args.backends:
                    found = service_part(args, inputs, backend, with_eval)
                    figures[f"service, {backend}, {label}"] = found
                    print(f"service, {backend}, {label}: {found['post_to_completed_seconds']} s POST -> completed "
                          f"(run {found['run_seconds']} s, {found['steps']} steps, {found['precision']})", flush=True)
                    print("\n".join(phase_lines(found["phases"])), flush=True)
            if args.part in ("both", "engine"):
                found = engine_part(inputs, with_eval)
                figures[f"engine, {label}"] = found
                print(f"engine, {label}: {found['seconds']} s ({found['steps']} steps of {found['steps_run']}, "
                      f"{found['precision']}, Acc_r {found['acc_r_before']} -> {found['acc_r_after']})", flush=True)
                print("\n".join(phase_lines(found["phases"])), flush=True)
    except (LoadError, EngineError) as exc:  # the engine part's bad inputs: a model, a forget set, a class
        print(f"request_latency: {exc}", file=sys.stderr)
        return 1
    import torch

    out = {"generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": {"platform": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
                       "threads": args.threads or torch.get_num_threads(),
                       "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
           "inputs": {k: str(v) for k, v in inputs.items()}, "figures": figures}
    write_json(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
