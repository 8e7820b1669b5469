"""benchmarks/throughput.py: a burst over several models drained by real workers, measured from the requests' timestamps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.service_fixtures import POSTGRES_ADMIN, REDIS_TEST_DB

REPO = Path(__file__).resolve().parents[2]


def test_a_burst_over_two_models_is_drained_and_measured(postgres_url, digits, digits_model, tmp_path):
    cache = tmp_path / "model"  # the session's digits and model, where the script builds its own
    cache.mkdir()
    (cache / "data").symlink_to(digits.root)
    (cache / "model").symlink_to(digits_model)
    out = tmp_path / "throughput.json"
    done = subprocess.run([sys.executable, "benchmarks/throughput.py", "--workers", "1", "--models", "2",
                           "--requests", "4", "--classes-per-model", "1", "--clients", "2", "--cache", str(cache),
                           "--postgres", POSTGRES_ADMIN, "--redis-db", str(REDIS_TEST_DB), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    [figures] = json.loads(out.read_text())["figures"]
    assert figures["requests"] == 4 and set(figures["statuses"]) <= {"completed", "propagated"}, figures
    # Each model's two requests name one class: they wait for, and are served by, one run of that model.
    assert figures["runs"] == 2 and figures["requests_per_run"] == 2.0 and figures["models_served"] == 2
    assert figures["runs_before_every_models_first"] == 0
    assert 0 < figures["longest_queue_wait_seconds"] <= figures["longest_wait_seconds"] <= figures["drained_seconds"]


def test_a_digits_model_asked_to_forget_every_class_is_refused_in_one_line():
    done = subprocess.run([sys.executable, "benchmarks/throughput.py", "--classes-per-model", "10"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "must keep a class" in done.stderr
