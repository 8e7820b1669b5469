"""The sweep runs beside the runs, never behind them: while a worker is busy with a long run, a dead
worker's lease is recovered and a deadline is flagged (real ``lethe worker --beat``, which starts a
``lethe sweeper`` of its own, on both backends).

Before, the sweep was a task on the runs' queue of a one-process worker: it waited for the run.
"""

from __future__ import annotations

from datetime import timedelta

from service.db import utcnow
from tests.service_fixtures import register_digits, request_body, wait_for
from tests.worker.runs.test_sweep import abandon

# A run of many folds of the generalisation check: a minute or more on the digits model.
LONG_RUN = {"LETHE_GATE_HOLDOUT_FOLDS": "40", "LETHE_GATE_HOLDOUT_IMAGES": "100000"}


def status(client, admin, request_id: str) -> dict:
    return client.get(f"/deletion-requests/{request_id}", headers=admin).json()


def test_leases_expire_and_deadlines_are_flagged_while_a_long_run_is_in_progress(
        backend, client, admin, digits, digits_model, start_worker):
    assert register_digits(client, admin, digits_model).status_code == 201
    assert register_digits(client, admin, digits_model, name="other").status_code == 201
    worker = start_worker(beat=True, **LONG_RUN)
    long_run = client.post("/deletion-requests", headers=admin, json=request_body(digits, "long")).json()["id"]
    wait_for(lambda: status(client, admin, long_run)["status"] == "running", 120,
             message=f"the long run to start; worker log:\n{worker.output()[-3000:]}")

    # Meanwhile: a request of another model whose worker died, and one that is at risk.
    orphan = client.post("/deletion-requests", headers=admin, json=request_body(digits, "orphan", model="other"))
    at_risk = client.post("/deletion-requests", headers=admin, json={
        **request_body(digits, "at-risk", model="other", forget_class="5"),
        "received_at": (utcnow() - timedelta(days=25)).isoformat()})
    orphan_id, at_risk_id = orphan.json()["id"], at_risk.json()["id"]
    abandon(backend, orphan_id)

    def recovered_and_flagged() -> bool:
        orphan_events = [(e["detail"] or {}).get("reason", "") for e in status(client, admin, orphan_id)["events"]]
        at_risk_events = [e["event"] for e in status(client, admin, at_risk_id)["events"]]
        return any("lease of worker:dead expired" in r for r in orphan_events) and "at_risk" in at_risk_events

    wait_for(recovered_and_flagged, 30, message=f"the sweep during the run; worker log:\n{worker.output()[-3000:]}")
    assert status(client, admin, long_run)["status"] == "running"  # the run was still going
