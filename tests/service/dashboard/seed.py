"""Seeded deletion requests for the dashboard's tests: due in 20 days, due in 3, overdue, completed.

Requests are accepted through the API (with past ``received_at`` dates); the completed one is then
processed the way a worker records a run (running -> version 2 published -> completed), without
training, so that the dashboard's tests need no worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from fastapi.testclient import TestClient

from service.config import Settings
from service.db import session_scope
from service.deletion_requests.models import DeletionRequest, RequestStatus
from service.consumers.propagation import propagate
from service.deletion_requests.transitions import transition
from service.registry.service import publish_version
from tests.service.conftest import register_digits, request_body

HOUR = timedelta(hours=1)
# external id -> (class, how long ago the data subject's request reached us); the window is 30 days,
# and the hour keeps each badge clear of a day boundary while the test runs
SEEDED = {"due-in-20": ("1", timedelta(days=10) - HOUR), "due-in-3": ("2", timedelta(days=27) - HOUR),
          "overdue": ("4", timedelta(days=33) + HOUR), "done": ("3", timedelta(days=5))}
BADGES = {"due-in-20": ("20 days left", "ok"), "due-in-3": ("3 days left", "amber"),
          "overdue": ("3 days overdue", "red"), "done": None}
PER_CLASS_BEFORE = {str(c): 95.0 + c * 0.3 for c in range(10)}


@dataclass(frozen=True)
class Seeded:
    ids: dict[str, str]  # external id -> request id


def completed_run_metrics() -> dict:
    after = {**{c: acc - 1.5 for c, acc in PER_CLASS_BEFORE.items()}, "3": 0.0}
    return {"method": "lora-kl", "config": {"reset_head_rows": True}, "steps": 7, "seconds": 4.2, "target_met": True,
            "device": "cpu", "precision": "fp32", "forget_set_size": {"3": 140}, "forget_acc_before": {"3": 100.0},
            "forget_acc_after": {"3": 0.0}, "forget_acc_trained": {"3": 0.7}, "cumulative_retain_drop": 1.5,
            "evaluation": {"images": 360, "acc_f_before": 97.2, "acc_f_after": 0.0, "acc_f_trained": 2.8,
                           "acc_r_before": 96.3,
                           "acc_r_after": 94.8, "per_class_before": PER_CLASS_BEFORE, "per_class_after": after,
                           "per_class_images": {c: 36 for c in PER_CLASS_BEFORE},
                           "half": "audit"},
            # No checkpoint reached the stop rule's margin: the best of those that forgot was kept.
            "selection": {"half": "selection", "images": 357, "step": 5, "selected_by": "target"},
            "gate_thresholds": {"forget_set_accuracy_max": 1.0, "evaluation_class_accuracy_max": 5.0,
                                "cumulative_retain_drop_max": 12.0, "generalisation_check_accuracy_max": None,
                                "probe_accuracy_max": 75.0, "mia_accuracy_max": None, "relearn_accuracy_max": None,
                                "probe_and_mia_judged_by": "the lower end of the 95% Wilson interval"},
            "residual_knowledge": {"3": {
                "measured_on": "audit",
                "probe": {"before": 94.6, "after": 71.2, "images": 18, "folds": 5, "seed": 0,
                          "before_interval": [74.2, 99.0], "after_interval": [48.0, 87.0]},
                "mia": {"before": 51.4, "after": 49.0, "before_interval": [40.0, 62.0], "after_interval": [38.0, 60.0],
                        "images_per_side": 18, "forget_images": 140, "unseen_images": 18, "folds": 10, "seed": 0},
                "relearn": {"before": 100.0, "after": 33.3, "k": 10, "steps": 10, "lr": 2e-4, "images_scored": 18,
                            "seed": 0}}}}


def seed(client: TestClient, admin: dict[str, str], digits, package, settings: Settings,
         run_seconds: float | None = None) -> Seeded:
    assert register_digits(client, admin, package, eval_set=f"file://{digits.val}").status_code == 201
    now = datetime.now(timezone.utc)
    ids = {}
    for external_id, (cls, ago) in SEEDED.items():
        body = {**request_body(digits, external_id, cls), "received_at": (now - ago).isoformat()}
        response = client.post("/deletion-requests", headers=admin, json=body)
        assert response.status_code == 202, response.text
        ids[external_id] = response.json()["id"]
    complete(settings, ids["done"], run_seconds)
    return Seeded(ids)


def complete(settings: Settings, request_id: str, run_seconds: float | None = None) -> None:
    """Record a finished run for a request as the worker does: version n+1 published, request
    completed, and propagated (the model has no consumers); the run started ``run_seconds`` ago."""
    metrics = completed_run_metrics()
    with session_scope(settings.database) as session:
        row = session.get(DeletionRequest, request_id)
        transition(session=session, request=row, to=RequestStatus.RUNNING, actor="worker:seed")
        if run_seconds is not None:
            row.started_at -= timedelta(seconds=run_seconds)
        first = row.model.versions[0]
        first.metrics = {"per_class_accuracy": PER_CLASS_BEFORE}
        version = publish_version(session=session, model_id=row.model_id, sha256="ab" * 32, size=123_456,
                                  card=first.card, classes_forgotten=[row.forget_class], metrics=metrics)
        row.fulfilled_version_id, row.metrics = version.id, metrics
        transition(session=session, request=row, to=RequestStatus.COMPLETED, actor="worker:seed",
                   detail={"version": version.version})
        propagate(session=session, model_id=row.model_id, actor="worker:seed")  # no consumers: at once
