"""What one run serves: requests for the same class with different forget sets are trained on
together, and each is verified on its own set before it completes (embedded default and Postgres;
the run is called in this process)."""

from __future__ import annotations

import shutil

from sqlalchemy import select

from service.config import get_unlearn_settings
from service.db import session_scope
from service.deletion_requests.models import DeletionRequest, RequestStatus as S
from service.registry.models import RegisteredModel
from tests.service_fixtures import register_digits, request_body
from worker.runs import claim_batch, run_batch


def split_forget_set(digits, backend, cls: str) -> tuple[list, list]:
    """The class's training images as two disjoint forget sets (two people's requests for one class)."""
    images = sorted(digits.train_class(cls).iterdir())
    halves = []
    for i, part in enumerate((images[0::2], images[1::2])):
        folder = digits.root / f"split-{backend.name}-{i}" / cls
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for image in part:
            shutil.copy(image, folder / image.name)
        halves.append(folder)
    return images, halves


def test_two_requests_for_one_class_train_on_both_sets_and_each_is_verified_on_its_own(
        backend, client, admin, digits, digits_model):
    assert register_digits(client, admin, digits_model).status_code == 201
    images, halves = split_forget_set(digits, backend, "3")
    ids = [client.post("/deletion-requests", headers=admin,
                       json=request_body(digits, external_id=f"subject-{i}", uri=f"file://{half}")).json()["id"]
           for i, half in enumerate(halves)]
    with session_scope(backend.settings.database) as session:
        model_id = session.scalar(select(RegisteredModel.id))
    batch = claim_batch(backend.settings, model_id, "w1")
    assert set(batch.requests) == set(ids)
    run_batch(backend.settings, batch, "w1")
    target = get_unlearn_settings().target_forget_acc
    with session_scope(backend.settings.database) as session:
        rows = [session.get(DeletionRequest, i) for i in ids]
        assert [r.status for r in rows] == [S.COMPLETED, S.COMPLETED], [r.error for r in rows]
        for row in rows:
            assert row.metrics["forget_set_size"] == {"3": len(images)}  # the union, not one request's set
            own = row.metrics["own_forget_set"]
            assert own["forget_acc_before"] > 50 and own["forget_acc_after"] <= target
