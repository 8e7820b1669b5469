"""benchmarks/request_latency.py: one request through the real service and the engine, timed by phase."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.service_fixtures import POSTGRES_ADMIN, REDIS_TEST_DB, REDIS_URL

REPO = Path(__file__).resolve().parents[2]


def test_one_request_is_timed_by_its_run_s_own_phases(postgres_url, digits, digits_model, tmp_path):
    # One backend: the script's two differ by their environment only (LETHE_DATABASE_URL, LETHE_BROKER_URL),
    # and every other service test runs both.
    out = tmp_path / "latency.json"
    done = subprocess.run([sys.executable, "benchmarks/request_latency.py", "--model", str(digits_model),
                           "--forget", str(digits.train_class("3")), "--forget-class", "3", "--eval-set",
                           str(digits.test), "--eval", "with", "--postgres", POSTGRES_ADMIN, "--redis", REDIS_URL,
                           "--redis-db", str(REDIS_TEST_DB), "--backends", "postgres", "--threads", "1",
                           "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(out.read_text())["figures"]
    assert set(figures) == {"service, postgres, with eval set", "engine, with eval set"}
    for service in [figures["service, postgres, with eval set"]]:
        phases = service["phases"]
        # The worker's phases around the engine's, each run as often as a run does it.
        assert {"fetch version", "check forget sets", "engine / unlearn / step", "engine / unlearn / selection evaluation",
                "engine / residual knowledge", "write candidate", "store candidate", "settle"} <= set(phases)
        assert phases["engine / unlearn / step"]["count"] >= service["steps"] >= 1
        assert sum(p["seconds"] for p in phases.values()) <= service["run_seconds"] + 0.5  # nested seconds not counted twice
        assert service["run_seconds"] <= service["post_to_completed_seconds"]
    engine = figures["engine, with eval set"]
    assert engine["target_met"] and engine["phases"]["engine / unlearn / step"]["count"] == engine["steps_run"]


def test_inputs_without_their_evaluation_set_are_refused_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/request_latency.py", "--forget", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "give --eval-set too (or --eval without)" in done.stderr
