"""benchmarks/scale.py: a seeded database at size, every listed call timed, the slowest statements explained."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.service_fixtures import POSTGRES_ADMIN

REPO = Path(__file__).resolve().parents[2]


def test_a_small_database_is_seeded_and_every_call_is_timed_and_explained(postgres_url, tmp_path):
    out = tmp_path / "scale.json"
    done = subprocess.run([sys.executable, "benchmarks/scale.py", "--models", "3", "--versions", "6", "--requests", "300",
                           "--samples", "2", "--postgres", POSTGRES_ADMIN, "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["sizes"]["deletion_requests"] == 300 and result["sizes"]["audit_events"] >= 300
    figures = result["figures"]
    calls = {k: v for k, v in figures.items() if "p99_ms" in v}
    assert {"POST /deletion-requests", "GET /deletion-requests", "dashboard requests page", "GET /metrics",
            "GET /deletion-requests, 10 pages by cursor"} <= set(calls)
    assert all(v["status"] == (202 if k.startswith("POST") else 200) for k, v in calls.items()), calls
    assert all(any("Scan" in line for line in v["plan"]) for v in calls.values() if "plan" in v)
    assert "plan" in calls["GET /deletion-requests"] and "plan" in calls["dashboard requests page"]
    csv = figures["dashboard CSV export"]
    assert csv["status"] == 200 and csv["rows"] == 300 + 1 + 2 + 1  # the seeded; the first, 2 timed and 1 explained POSTs
    assert len(figures["sweep"]["seconds"]) == 3


def test_sizes_that_cannot_be_seeded_are_refused_in_one_line():
    done = subprocess.run([sys.executable, "benchmarks/scale.py", "--models", "10", "--versions", "3"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "a version per model" in done.stderr
