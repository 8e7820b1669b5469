"""The API under load: `lethe serve` on the real Postgres and Redis, driven from another process.

    .venv/bin/python benchmarks/api_load.py                       # 2 API workers, 32 connections, 25 MB weights
    .venv/bin/python benchmarks/api_load.py --workers 4 --concurrency 64 --requests 5000
    .venv/bin/python benchmarks/api_load.py --requests 200 --weights-mb 1 --out /tmp/smoke.json   # quick look
    .venv/bin/python benchmarks/api_load.py --ramp 1,10,50,100,200,500,1000      # bursts, both backends

It builds a throw-away stack: a new database on the Postgres server (``--postgres``), migrated with
``lethe db upgrade``; an API key; ``lethe serve --workers N`` (the production set-up: one process per
core; Celery workers are not started, since enqueueing is the API's part and a worker only drains the
queue, which lives in its own Redis database, ``--redis-db``, flushed before and after); a model
registered through ``POST /models`` whose weights are ``--weights-mb`` of a timm ViT (random weights:
only their size matters). Beside it, a trivial FastAPI app (one endpoint returning a constant) runs
under uvicorn with the same number of workers, and Python's static file server serves the same
weights file. The load generator is a separate process (asyncio + httpx, ``--concurrency``
connections), so client and servers share the machine's cores as they would on one host; every figure
is therefore reported next to the trivial endpoint's, measured in the same run: that ratio is the one
that carries to another machine.

With ``--ramp 1,10,100,1000`` it measures bursts instead: at each step that many clients at once,
each on a connection of its own, each sending a new deletion request, reading it back and reading
``/models/current``, on each backend of ``--backends`` (Postgres + Redis, and the embedded SQLite
default). Per step: requests/s, p50/p99/max latency, statuses, transport errors, 503s without
Retry-After, and accepted requests missing from the database; then where errors and latency start.
``--service-repo`` measures another checkout of Lethe (the commit before a change, say) with this
script. Figures go to ``results/api_ramp.json``.

Scenarios: ``POST /deletion-requests`` (distinct external ids, all for one class), ``GET
/models/current`` with and without ``If-None-Match``, ``/healthz`` (the app's own trivial route, with
its middleware), the bare trivial app; requests/s, p50/p99 latency, statuses. Then the weights
download, MB/s by ``curl`` from the API and from the static server. Finally every request answered 202
is looked up in the database: the run fails if one is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack, closing
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

POSTGRES_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
CLASSES = [f"class-{i}" for i in range(10)]
MODEL = "load-test"
EXPECTED = {"POST /deletion-requests": "202", "GET /models/current (If-None-Match)": "304"}  # else 200


class LoadError(Exception):
    """A set-up or check that failed: one line for the user."""


# --- the load generator (runs in its own process) ---------------------------------------------

async def generate(spec: dict[str, Any]) -> dict[str, Any]:
    """Send ``spec['requests']`` requests over ``spec['concurrency']`` connections, after a warm-up.

    ``spec['body']``, when given, is JSON with ``{id}`` replaced by a fresh id per request (the
    ids answered 202 are returned, for the check that nothing was lost).
    """
    import httpx

    limits = httpx.Limits(max_connections=spec["concurrency"], max_keepalive_connections=spec["concurrency"])
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    accepted: list[str] = []
    errors: list[str] = []
    prefix = spec.get("id_prefix", "")

    async with httpx.AsyncClient(base_url=spec["base_url"], limits=limits, timeout=30.0,
                                 headers=spec.get("headers", {})) as client:
        async def one(n: int, measured: bool) -> None:
            external_id = f"{prefix}{n}"
            body = spec.get("body")
            content = body.replace("{id}", external_id).encode() if body else None
            started = time.perf_counter()
            try:
                response = await client.request(spec["method"], spec["path"], content=content,
                                                headers={"content-type": "application/json"} if body else None)
            except httpx.HTTPError as exc:
                if measured:
                    errors.append(f"{type(exc).__name__}: {exc}")
                return
            elapsed = time.perf_counter() - started
            if response.status_code == 202:
                accepted.append(external_id)  # warm-up ones too: they must be in the database as well
            if not measured:
                return
            latencies.append(elapsed)
            statuses[str(response.status_code)] = statuses.get(str(response.status_code), 0) + 1

        async def run(first: int, count: int, measured: bool) -> None:
            counter = iter(range(first, first + count))

            async def worker() -> None:
                for n in counter:
                    await one(n, measured)

            await asyncio.gather(*(worker() for _ in range(spec["concurrency"])))

        await run(0, spec["warmup"], measured=False)
        started = time.perf_counter()
        await run(spec["warmup"], spec["requests"], measured=True)
        seconds = time.perf_counter() - started

    ms = sorted(x * 1000 for x in latencies)
    return {
        "requests": spec["requests"], "concurrency": spec["concurrency"], "seconds": round(seconds, 3),
        "requests_per_second": round(len(ms) / seconds, 1) if seconds else None,
        "p50_ms": round(_percentile(ms, 50), 2) if ms else None, "p99_ms": round(_percentile(ms, 99), 2) if ms else None,
        "statuses": statuses, "errors": len(errors), "first_errors": errors[:3], "accepted_ids": accepted,
    }


async def burst(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec['clients']`` clients at once, each on its own connection: POST a new request, GET it
    back, GET /models/current. Every answer is recorded; a transport error is an error."""
    import httpx

    n = spec["clients"]
    # Idle connections expire before the server's 5 s keep-alive does: reusing one the server is closing
    # at that moment is a client-side race (ReadError), not something the server did wrong.
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n, keepalive_expiry=1.0)
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    errors: list[str] = []
    accepted: list[str] = []
    no_retry_after = 0

    async with httpx.AsyncClient(base_url=spec["base_url"], limits=limits, timeout=spec["timeout"],
                                 headers=spec["headers"]) as client:
        gate = asyncio.Event()

        async def call(method: str, path: str, **kwargs) -> httpx.Response | None:
            nonlocal no_retry_after
            started = time.perf_counter()
            try:
                response = await client.request(method, path, **kwargs)
            except httpx.HTTPError as exc:
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
                return None
            latencies.append(time.perf_counter() - started)
            statuses[str(response.status_code)] = statuses.get(str(response.status_code), 0) + 1
            if response.status_code == 503 and "retry-after" not in response.headers:
                no_retry_after += 1
            return response

        async def one_client(i: int) -> None:
            await gate.wait()
            external_id = f"{spec['id_prefix']}{i}"
            posted = await call("POST", "/deletion-requests", content=spec["body"].replace("{id}", external_id),
                                headers={"content-type": "application/json"})
            if posted is not None and posted.status_code == 202:
                accepted.append(external_id)
                await call("GET", f"/deletion-requests/{posted.json()['id']}")
            await call("GET", "/models/current")

        tasks = [asyncio.create_task(one_client(i)) for i in range(n)]
        await asyncio.sleep(0.05)
        started = time.perf_counter()
        gate.set()
        await asyncio.gather(*tasks)
        seconds = time.perf_counter() - started

    ms = sorted(x * 1000 for x in latencies)
    return {
        "clients": n, "requests": len(ms) + len(errors), "seconds": round(seconds, 3),
        "requests_per_second": round(len(ms) / seconds, 1) if seconds else None,
        "p50_ms": round(_percentile(ms, 50), 1) if ms else None, "p99_ms": round(_percentile(ms, 99), 1) if ms else None,
        "max_ms": round(ms[-1], 1) if ms else None, "statuses": statuses, "errors": len(errors),
        "first_errors": sorted(set(errors))[:3], "503_without_retry_after": no_retry_after, "accepted_ids": accepted,
    }


def _percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    rank = max(1, min(len(sorted_values), math.ceil(q / 100 * len(sorted_values))))
    return sorted_values[rank - 1]


def run_generator(spec: dict[str, Any], mode: str = "--generate") -> dict[str, Any]:
    """The generator in a child process (its own interpreter and event loop)."""
    done = subprocess.run([sys.executable, __file__, mode, json.dumps(spec)], capture_output=True, text=True)
    if done.returncode != 0:
        raise LoadError(f"load generator failed: {(done.stderr.strip().splitlines() or ['no output'])[-1]}")
    return json.loads(done.stdout)


# --- the stack under test ----------------------------------------------------------------------

def free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, timeout: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise LoadError(f"{' '.join(map(str, process.args[:4]))} exited with {process.returncode} before answering")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise LoadError(f"{url} did not answer within {timeout:.0f} s")


def start(command: list[str], env: dict[str, str], log: Path, health_url: str, cwd: Path = REPO) -> subprocess.Popen:
    with open(log, "ab") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                   start_new_session=True)
    try:
        wait_until_up(health_url, process)
    except BaseException:
        stop(process)
        raise
    return process


def stop(process: subprocess.Popen) -> None:
    """Stop the server and whatever it started (its own session's process group)."""
    try:
        os.killpg(process.pid, 15)  # uvicorn's supervisor stops its workers on SIGTERM
    except ProcessLookupError:
        return
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, 9)  # workers the supervisor left behind, if any
    except ProcessLookupError:
        pass
    process.wait()


class Database:
    """A fresh database on the server, dropped afterwards."""

    def __init__(self, admin_url: str) -> None:
        from sqlalchemy import create_engine
        from sqlalchemy.engine import make_url

        self.name = f"lethe_api_load_{uuid.uuid4().hex[:8]}"
        self.admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        self.url = make_url(admin_url).set(database=self.name).render_as_string(hide_password=False)

    def __enter__(self) -> Database:
        from sqlalchemy import text

        try:
            with self.admin.connect() as c:
                c.execute(text(f'CREATE DATABASE "{self.name}"'))
        except Exception as exc:
            raise LoadError(f"cannot create a database on {self.admin.url.render_as_string()}: "
                            f"{str(exc).splitlines()[0]} (pass --postgres)") from None
        return self

    def __exit__(self, *exc: object) -> None:
        from sqlalchemy import text

        with self.admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
        self.admin.dispose()

    def missing(self, external_ids: list[str]) -> list[str]:
        return missing_requests(self.url, external_ids)


def missing_requests(url: str, external_ids: list[str]) -> list[str]:
    """The ids with no deletion request row (queued, as the 202 said)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.connect() as c:
            found = set(c.execute(text("SELECT external_id FROM deletion_requests WHERE status = 'queued'")).scalars())
    finally:
        engine.dispose()
    return [i for i in external_ids if i not in found]


def flush_redis(url: str) -> None:
    import redis

    try:
        redis.Redis.from_url(url).flushdb()
    except redis.RedisError as exc:
        raise LoadError(f"cannot reach Redis at {url}: {exc} (pass --redis)") from None


def weights_package(folder: Path, megabytes: float) -> Path:
    """A ViT package whose weights file is about ``megabytes`` MB: 4 blocks, width chosen to fit."""
    import torch

    from worker.engine.package import ModelCard, build_model, write_package

    heads, depth = 6, 4
    width = max(heads * 2, round((megabytes * 1e6 / 4 / (12 * depth)) ** 0.5 / (heads * 2)) * heads * 2)
    card = {"architecture": "vit_small_patch16_224",
            "kwargs": {"img_size": 32, "patch_size": 4, "depth": depth, "embed_dim": width, "num_heads": heads},
            "classes": CLASSES,
            "input": {"size": [32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "channels": "RGB"}}
    torch.manual_seed(0)
    import timm

    model = timm.create_model(card["architecture"], pretrained=False, num_classes=len(CLASSES), **card["kwargs"])
    build_model(ModelCard.from_dict(card), model.state_dict())  # the registry will check the same
    write_package(folder, card, model.state_dict())
    return folder


def curl_download(url: str, headers: dict[str, str], repeats: int) -> dict[str, Any]:
    """MB/s of `curl` fetching ``url`` to /dev/null: median and best of ``repeats``."""
    if shutil.which("curl") is None:
        raise LoadError("curl is not installed (apt install curl)")
    speeds, size = [], None
    for _ in range(repeats):
        command = ["curl", "-sS", "--fail", "-o", "/dev/null", "-w", "%{speed_download} %{size_download}", url]
        for k, v in headers.items():
            command += ["-H", f"{k}: {v}"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise LoadError(f"curl {url}: {done.stderr.strip()}")
        speed, size = done.stdout.split()
        speeds.append(float(speed) / 1e6)
    return {"bytes": int(size), "repeats": repeats, "median_mb_per_s": round(statistics.median(speeds), 1),
            "best_mb_per_s": round(max(speeds), 1)}


# --- the run -----------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict[str, Any]:
    redis_url = f"{args.redis.rstrip('/')}/{args.redis_db}"
    with ExitStack() as stack:
        home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lethe-api-load-")))
        db = stack.enter_context(Database(args.postgres))
        flush_redis(redis_url)
        stack.callback(flush_redis, redis_url)
        data_root = home / "data"
        (data_root / "forget").mkdir(parents=True)
        env = {**os.environ, "LETHE_HOME": str(home / "lethe"), "LETHE_DATABASE_URL": db.url,
               "LETHE_BROKER_URL": redis_url, "LETHE_DATA_ROOTS": str(data_root), "LETHE_LOG_LEVEL": "INFO",
               "LETHE_LOG_FORMAT": "json", "PYTHONPATH": str(REPO)}
        lethe = [sys.executable, "-m", "service.cli"]
        for step in (["db", "upgrade"], ["keys", "create", "--name", "load", "--scope", "admin"]):
            done = subprocess.run(lethe + step, env=env, capture_output=True, text=True, cwd=REPO)
            if done.returncode != 0:
                raise LoadError(f"lethe {' '.join(step)}: {done.stderr.strip().splitlines()[-1]}")
        key = done.stdout.strip().splitlines()[-1]
        auth = {"Authorization": f"Bearer {key}"}

        api_port, trivial_port, static_port = free_port(), free_port(), free_port()
        api = f"http://127.0.0.1:{api_port}"
        stack.callback(stop, start(lethe + ["serve", "--port", str(api_port), "--workers", str(args.workers)],
                                   env, home / "api.log", f"{api}/healthz"))
        trivial = f"http://127.0.0.1:{trivial_port}"
        stack.callback(stop, start([sys.executable, "-m", "uvicorn", "benchmarks.trivial_app:app", "--port",
                                    str(trivial_port), "--workers", str(args.workers), "--no-access-log",
                                    "--log-level", "warning"], env, home / "trivial.log", f"{trivial}/ping"))

        package = weights_package(home / "package", args.weights_mb)
        version = register(api, auth, package)
        static_dir = home / "static"
        static_dir.mkdir()
        os.link(package / "model.safetensors", static_dir / "model.safetensors")
        static = f"http://127.0.0.1:{static_port}"
        stack.callback(stop, start([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory",
                                    str(static_dir), str(static_port)], env, home / "static.log",
                                   f"{static}/model.safetensors"))

        base = {"concurrency": args.concurrency, "requests": args.requests, "warmup": args.warmup}
        forget_uri = (data_root / "forget").as_uri()
        body = json.dumps({"external_id": "{id}", "model": MODEL, "forget_class": CLASSES[3],
                           "forget_set": {"uri": forget_uri}})
        etag = f'"{version["sha256"]}"'
        scenarios = {
            "trivial FastAPI app": base | {"base_url": trivial, "method": "GET", "path": "/ping"},
            "GET /healthz": base | {"base_url": api, "method": "GET", "path": "/healthz"},
            "POST /deletion-requests": base | {"base_url": api, "method": "POST", "path": "/deletion-requests",
                                               "headers": auth, "body": body, "id_prefix": f"load-{uuid.uuid4().hex[:6]}-"},
            "GET /models/current": base | {"base_url": api, "method": "GET", "path": "/models/current", "headers": auth},
            "GET /models/current (If-None-Match)": base | {
                "base_url": api, "method": "GET", "path": "/models/current", "headers": auth | {"If-None-Match": etag}},
        }
        results: dict[str, Any] = {}
        for name, spec in scenarios.items():
            results[name] = run_generator(spec)
            print(_one_line(name, results[name]), flush=True)

        posted = results["POST /deletion-requests"]
        accepted = posted.pop("accepted_ids")
        for r in results.values():
            r.pop("accepted_ids", None)
        missing = db.missing(accepted)
        posted["accepted_in_database"] = len(accepted) - len(missing)
        posted["accepted"] = len(accepted)

        weights_url = f"{api}/models/{MODEL}/versions/1/weights"
        download = {"api": curl_download(weights_url, auth, args.download_repeats),
                    "static server": curl_download(f"{static}/model.safetensors", {}, args.download_repeats)}
        download["ratio_api_to_static"] = round(download["api"]["median_mb_per_s"]
                                                / download["static server"]["median_mb_per_s"], 3)
        print(f"weights ({download['api']['bytes'] / 1e6:.1f} MB): API {download['api']['median_mb_per_s']} MB/s, "
              f"static server {download['static server']['median_mb_per_s']} MB/s", flush=True)
        if missing:
            raise LoadError(f"{len(missing)} of {len(accepted)} accepted requests are not in the database, "
                            f"e.g. {missing[0]!r}")
        unexpected = {name: (r["statuses"], r["first_errors"]) for name, r in results.items()
                      if r["errors"] or set(r["statuses"]) != {EXPECTED.get(name, "200")}}
        if unexpected:  # a figure made of error responses measures nothing
            raise LoadError(f"unexpected answers: {unexpected}")

    trivial_rps = results["trivial FastAPI app"]["requests_per_second"]
    for r in results.values():
        r["ratio_to_trivial"] = round(r["requests_per_second"] / trivial_rps, 3) if trivial_rps else None
    return {"scenarios": results, "weights_download": download}


# --- the ramp ----------------------------------------------------------------------------------

def lethe_stack(stack: ExitStack, args: argparse.Namespace, backend: str) -> dict[str, Any]:
    """A throw-away Lethe of ``args.service_repo`` on ``backend`` ("postgres": a new database and a
    flushed Redis db; "embedded": SQLite and the SQL transport in a temporary home), migrated, with an
    admin key, served by ``lethe serve --workers N`` and a registered model."""
    repo = args.service_repo
    home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"lethe-ramp-{backend}-")))
    data_root = home / "data"
    (data_root / "forget").mkdir(parents=True)
    env = {**os.environ, "LETHE_HOME": str(home / "lethe"), "LETHE_DATA_ROOTS": str(data_root),
           "LETHE_LOG_LEVEL": "WARNING", "PYTHONPATH": str(repo)}
    database = f"sqlite:///{home / 'lethe' / 'lethe.db'}"
    if backend == "postgres":
        database = stack.enter_context(Database(args.postgres)).url
        redis_url = f"{args.redis.rstrip('/')}/{args.redis_db}"
        flush_redis(redis_url)
        stack.callback(flush_redis, redis_url)
        env |= {"LETHE_DATABASE_URL": database, "LETHE_BROKER_URL": redis_url}
    lethe = [sys.executable, "-m", "service.cli"]
    auth = migrated_with_admin_key(env, repo, "load")
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    stack.callback(stop, start(lethe + ["serve", "--port", str(port), "--workers", str(args.workers)], env,
                               home / "api.log", f"{api}/healthz", cwd=repo))
    register(api, auth, weights_package(home / "package", args.weights_mb))
    return {"api": api, "auth": auth, "database": database, "forget_uri": (data_root / "forget").as_uri()}


def migrated_with_admin_key(env: dict[str, str], repo: Path, name: str) -> dict[str, str]:
    """``lethe db upgrade`` and ``lethe keys create --scope admin`` on ``env``'s database (run in the
    checkout ``repo``); the new key's Authorization header."""
    lethe = [sys.executable, "-m", "service.cli"]
    for step in (["db", "upgrade"], ["keys", "create", "--name", name, "--scope", "admin"]):
        done = subprocess.run(lethe + step, env=env, capture_output=True, text=True, cwd=repo)
        if done.returncode != 0:
            raise LoadError(f"lethe {' '.join(step)}: {(done.stderr.strip().splitlines() or ['no output'])[-1]}")
    return {"Authorization": f"Bearer {done.stdout.strip().splitlines()[-1]}"}


def run_ramp(args: argparse.Namespace) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for backend in args.backends:
        with ExitStack() as stack:
            lethe = lethe_stack(stack, args, backend)
            body = json.dumps({"external_id": "{id}", "model": MODEL, "forget_class": CLASSES[3],
                               "forget_set": {"uri": lethe["forget_uri"]}})
            steps = []
            for clients in args.ramp:
                spec = {"base_url": lethe["api"], "headers": lethe["auth"], "clients": clients, "body": body,
                        "timeout": args.client_timeout, "id_prefix": f"ramp-{clients}-{uuid.uuid4().hex[:6]}-"}
                step = run_generator(spec, mode="--burst")
                accepted = step.pop("accepted_ids")
                step["accepted"] = len(accepted)
                step["accepted_missing_from_database"] = len(missing_requests(lethe["database"], accepted))
                steps.append(step)
                print(f"{backend} {_ramp_line(step)}", flush=True)
        figures[backend] = {"steps": steps, "first_trouble": first_trouble(steps)}
    return figures


def first_trouble(steps: list[dict[str, Any]]) -> dict[str, int | None]:
    """The smallest number of clients at which each kind of trouble was seen (None: never)."""
    def first(predicate) -> int | None:
        return next((s["clients"] for s in steps if predicate(s)), None)

    return {
        "5xx other than 503": first(lambda s: any(k.startswith("5") and k != "503" for k in s["statuses"])),
        "503": first(lambda s: "503" in s["statuses"]),
        "transport errors": first(lambda s: s["errors"]),
        "lost requests": first(lambda s: s["accepted_missing_from_database"]),
        "p99 over 1 s": first(lambda s: (s["p99_ms"] or 0) > 1000),
    }


def _ramp_line(step: dict[str, Any]) -> str:
    return (f"{step['clients']:>5} clients: {step['requests']} requests in {step['seconds']} s, "
            f"{step['requests_per_second']} req/s, p50 {step['p50_ms']} ms, p99 {step['p99_ms']} ms, "
            f"max {step['max_ms']} ms, statuses {step['statuses']}, errors {step['errors']}, "
            f"lost {step['accepted_missing_from_database']}")


def register(api: str, auth: dict[str, str], package: Path) -> dict[str, Any]:
    import httpx

    with open(package / "model.json", "rb") as card, open(package / "model.safetensors", "rb") as weights:
        response = httpx.post(f"{api}/models", headers=auth, data={"name": MODEL}, timeout=120.0,
                              files={"card": ("model.json", card), "weights": ("model.safetensors", weights)})
    if response.status_code != 201:
        raise LoadError(f"registering the model: {response.status_code} {response.text[:200]}")
    return response.json()


def _one_line(name: str, r: dict[str, Any]) -> str:
    return (f"{name}: {r['requests_per_second']} req/s, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, "
            f"statuses {r['statuses']}, errors {r['errors']}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", default=POSTGRES_ADMIN,
                        help="a server URL whose user may create databases (default: %(default)s)")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379", help="Redis server (default: %(default)s)")
    parser.add_argument("--redis-db", type=int, default=12, help="the Redis database to use and flush (default: 12)")
    parser.add_argument("--workers", type=int, default=2, help="API processes (default: 2, one per core here)")
    parser.add_argument("--concurrency", type=int, default=32, help="open connections (default: 32)")
    parser.add_argument("--requests", type=int, default=3000, help="measured requests per scenario (default: 3000)")
    parser.add_argument("--warmup", type=int, default=100, help="requests per scenario before measuring")
    parser.add_argument("--weights-mb", type=float, default=25.0, help="size of the weights file (default: 25)")
    parser.add_argument("--download-repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "api_load.json")
    parser.add_argument("--ramp", type=_clients, default=None,
                        help="measure bursts of this many simultaneous clients instead, e.g. 1,10,100,1000")
    parser.add_argument("--backends", type=_backends, default=("postgres", "embedded"),
                        help="the ramp's backends: postgres, embedded or both (default: both)")
    parser.add_argument("--client-timeout", type=float, default=120.0, help="the ramp's client timeout, s")
    parser.add_argument("--service-repo", type=Path, default=REPO,
                        help="the checkout of Lethe the ramp serves (default: this one)")
    parser.add_argument("--generate", help=argparse.SUPPRESS)  # child mode: one scenario's spec, as JSON
    parser.add_argument("--burst", help=argparse.SUPPRESS)  # child mode: one ramp step's spec, as JSON
    args = parser.parse_args(argv)
    if args.ramp is not None and args.out == parser.get_default("out"):
        args.out = REPO / "benchmarks" / "results" / "api_ramp.json"
    if not (args.service_repo / "service" / "cli.py").is_file():
        parser.error(f"--service-repo {args.service_repo} is not a checkout of Lethe (no service/cli.py)")
    for name in ("workers", "concurrency", "requests", "download_repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or args.weights_mb <= 0:
        parser.error("--warmup must be 0 or more and --weights-mb positive")
    return args


def _clients(text: str) -> tuple[int, ...]:
    try:
        steps = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of client counts") from None
    if not steps or min(steps) < 1:
        raise argparse.ArgumentTypeError("client counts must be at least 1")
    return steps


def _backends(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = sorted(set(names) - {"postgres", "embedded"})
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"backends are postgres and embedded, not {', '.join(unknown) or text!r}")
    return names


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.generate:
        print(json.dumps(asyncio.run(generate(json.loads(args.generate)))))
        return 0
    if args.burst:
        print(json.dumps(asyncio.run(burst(json.loads(args.burst)))))
        return 0
    try:
        figures = run_ramp(args) if args.ramp else run(args)
    except LoadError as exc:
        print(f"api_load: error: {exc}", file=sys.stderr)
        return 2
    settings = {"workers": args.workers, "weights_mb": args.weights_mb}
    settings |= ({"ramp": list(args.ramp), "backends": list(args.backends), "service_repo": str(args.service_repo)}
                 if args.ramp else {"concurrency": args.concurrency, "requests": args.requests, "warmup": args.warmup})
    figures = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "python": platform.python_version(),
        "settings": settings, "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    } | figures
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"figures: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
