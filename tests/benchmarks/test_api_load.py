"""benchmarks/api_load.py: the API under load on real Postgres and Redis, and nothing accepted is lost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from benchmarks import api_load
from tests.service_fixtures import POSTGRES_ADMIN, REDIS_TEST_DB, REDIS_URL

REPO = Path(__file__).resolve().parents[2]


def test_percentiles_are_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert api_load._percentile(values, 50) == 50.0
    assert api_load._percentile(values, 99) == 99.0
    assert api_load._percentile([7.0], 99) == 7.0


@pytest.mark.parametrize("megabytes", [0.5, 3.0])
def test_the_synthetic_package_has_about_the_asked_weights_size(tmp_path, megabytes):
    package = api_load.weights_package(tmp_path / "pkg", megabytes)
    size = (package / "model.safetensors").stat().st_size
    assert 0.7 * megabytes * 1e6 < size < 1.4 * megabytes * 1e6
    with safe_open(package / "model.safetensors", "pt") as weights:
        assert "head.weight" in weights.keys()


def test_bad_arguments_are_one_line_errors():
    done = subprocess.run([sys.executable, "benchmarks/api_load.py", "--workers", "0"], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 2 and "--workers must be at least 1" in done.stderr


def test_an_unreachable_postgres_is_a_clear_error(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/api_load.py", "--postgres",
                           "postgresql+psycopg://postgres@127.0.0.1:1/postgres", "--redis-db", str(REDIS_TEST_DB),
                           "--out", str(tmp_path / "x.json")], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.startswith("api_load: error: cannot create a database") and "Traceback" not in done.stderr


def test_a_small_run_measures_every_scenario_and_finds_every_accepted_request(postgres_url, tmp_path):
    out = tmp_path / "api_load.json"
    done = subprocess.run([sys.executable, "benchmarks/api_load.py", "--postgres", POSTGRES_ADMIN,
                           "--redis", REDIS_URL, "--redis-db", str(REDIS_TEST_DB), "--workers", "2",
                           "--concurrency", "4", "--requests", "40", "--warmup", "5", "--weights-mb", "0.5",
                           "--download-repeats", "1", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(out.read_text())
    scenarios = figures["scenarios"]
    assert set(scenarios) == {"trivial FastAPI app", "GET /healthz", "POST /deletion-requests",
                              "GET /models/current", "GET /models/current (If-None-Match)"}
    expected = {"POST /deletion-requests": "202", "GET /models/current (If-None-Match)": "304"}
    for name, r in scenarios.items():
        assert r["statuses"] == {expected.get(name, "200"): 40} and r["errors"] == 0, name
        assert r["requests_per_second"] > 0 and r["p50_ms"] <= r["p99_ms"]
        assert r["ratio_to_trivial"] > 0
    posted = scenarios["POST /deletion-requests"]
    assert posted["accepted"] == posted["accepted_in_database"] == 45  # warm-up requests are accepted too
    download = figures["weights_download"]
    assert download["api"]["bytes"] == download["static server"]["bytes"] > 400_000
    assert download["ratio_api_to_static"] > 0


@pytest.mark.parametrize(("argument", "message"), [("--ramp=0,5", "client counts must be at least 1"),
                                                   ("--ramp=a,b", "comma-separated list of client counts"),
                                                   ("--backends=mysql", "backends are postgres and embedded")])
def test_bad_ramp_arguments_are_one_line_errors(argument, message):
    done = subprocess.run([sys.executable, "benchmarks/api_load.py", argument], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and message in done.stderr


def test_a_small_ramp_on_both_backends_reports_each_step_and_loses_nothing(postgres_url, tmp_path):
    out = tmp_path / "ramp.json"
    done = subprocess.run([sys.executable, "benchmarks/api_load.py", "--ramp", "1,8", "--postgres", POSTGRES_ADMIN,
                           "--redis", REDIS_URL, "--redis-db", str(REDIS_TEST_DB), "--workers", "1",
                           "--weights-mb", "0.5", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(out.read_text())
    for backend in ("postgres", "embedded"):
        steps = figures[backend]["steps"]
        assert [s["clients"] for s in steps] == [1, 8]
        for step in steps:  # each client: a new request, read back, and the current model
            assert step["statuses"] == {"202": step["clients"], "200": 2 * step["clients"]} and step["errors"] == 0
            assert step["accepted"] == step["clients"] and step["accepted_missing_from_database"] == 0
            assert step["p50_ms"] <= step["p99_ms"] <= step["max_ms"]
        assert figures[backend]["first_trouble"]["5xx other than 503"] is None
