"""What one run serves: requests for the same class with different forget sets are trained on
together, and each is verified on its own set before it completes (embedded default and Postgres;
the run is called in this process)."""

from __future__ import annotations

import hashlib
import os
import shutil
import time

from sqlalchemy import select

from service.config import get_unlearn_settings
from service.db import session_scope
from service.deletion_requests.models import DeletionRequest, RequestStatus as S
from service.registry.models import RegisteredModel
from tests.service_fixtures import register_digits, request_body
from worker.engine.images import set_digest
from worker.runs.gate import GateVerdict
from worker.runs.leases import claim_batch
from worker.runs.pipeline import process_model, run_batch
from worker.runs.settle import finish
from worker.runs.train import BatchResult


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
        assert [r.status for r in rows] == [S.PROPAGATED, S.PROPAGATED], [r.error for r in rows]
        for row, half in zip(rows, halves):
            assert row.metrics["forget_set_size"] == {"3": len(images)}  # the union, not one request's set
            own = row.metrics["own_forget_set"]
            assert own["forget_acc_before"] > 50 and own["forget_acc_after"] <= target
            # ... judged on the trained network, before the class's head row was reset (which alone
            # would put it at 0 %): the engine's figure for this request's set among the class's two
            assert own["forget_acc_trained"] <= target
            # ... and the digest a requester checks their own photos against (not the union's)
            files = [hashlib.sha256(f.read_bytes()).hexdigest() for f in half.iterdir()]
            assert (own["images"], own["sha256"]) == (len(files), set_digest(files))


def model_id_of(backend) -> str:
    with session_scope(backend.settings.database) as session:
        return session.scalar(select(RegisteredModel.id))


def statuses(backend, ids) -> list[str]:
    with session_scope(backend.settings.database) as session:
        return [session.get(DeletionRequest, i).status for i in ids]


def test_a_run_serves_at_most_max_batch_requests_oldest_first(backend, client, admin, digits, digits_model):
    assert register_digits(client, admin, digits_model).status_code == 201
    ids = [client.post("/deletion-requests", headers=admin,
                       json=request_body(digits, external_id=f"subject-{c}", forget_class=c)).json()["id"]
           for c in ("3", "5", "7")]
    capped = backend.settings.model_copy(update={"max_batch_requests": 2})
    batch = claim_batch(capped, model_id_of(backend), "w1")
    assert list(batch.requests) == ids[:2]
    assert statuses(backend, ids) == [S.RUNNING, S.RUNNING, S.QUEUED]


def test_a_worker_runs_one_batch_per_wake_up_and_names_the_next_for_the_queue(backend, client, admin, digits,
                                                                              digits_model):
    assert register_digits(client, admin, digits_model).status_code == 201
    ids = [client.post("/deletion-requests", headers=admin,
                       json=request_body(digits, external_id=f"subject-{c}", forget_class=c)).json()["id"]
           for c in ("3", "5")]
    capped = backend.settings.model_copy(update={"max_batch_requests": 1})
    assert process_model(capped, model_id_of(backend), "w1") == ids[1]  # sent to the back of the queue
    assert statuses(backend, ids) == [S.PROPAGATED, S.QUEUED]


def test_a_request_whose_images_break_its_batch_fails_alone_and_the_other_completes(
        backend, client, admin, digits, digits_model, tmp_path):
    # The model's anchor set holds one image of digit 3's forget set: a run forgetting 3 is refused by
    # the engine, a run forgetting 5 is not. Both requests land in one batch.
    anchor = digits.root / f"anchor-{backend.name}"
    shutil.rmtree(anchor, ignore_errors=True)
    anchor.mkdir()
    shutil.copy(sorted(digits.train_class("3").iterdir())[0], anchor / "stray.png")
    for i, image in enumerate(sorted((digits.test / "0").iterdir())[:8]):  # stand-ins for images of no class
        shutil.copy(image, anchor / f"other-{i}.png")
    with open(digits_model / "model.json", "rb") as card, open(digits_model / "model.safetensors", "rb") as weights:
        assert client.post("/models", headers=admin, data={"name": "digits", "anchor_set": f"file://{anchor}"},
                           files={"card": card, "weights": weights}).status_code == 201
    poison, fine = [client.post("/deletion-requests", headers=admin,
                                json=request_body(digits, external_id=f"subject-{c}", forget_class=c)).json()["id"]
                    for c in ("3", "5")]
    model_id = model_id_of(backend)
    first = claim_batch(backend.settings, model_id, "w1")
    assert set(first.requests) == {poison, fine}
    run_batch(backend.settings, first, "w1")
    assert statuses(backend, [poison, fine]) == [S.QUEUED, S.QUEUED]  # the batch failed: each runs alone next
    while (batch := claim_batch(backend.settings, model_id, "w1")) is not None:
        assert len(batch.requests) == 1
        run_batch(backend.settings, batch, "w1")
    assert statuses(backend, [poison, fine]) == [S.FAILED, S.PROPAGATED]
    with session_scope(backend.settings.database) as session:
        assert "anchor source holds images of a forget set" in session.get(DeletionRequest, poison).error


def test_one_class_failing_the_gate_in_a_batch_runs_again_alone_and_fails_only_then(
        backend, client, admin, digits, digits_model):
    assert register_digits(client, admin, digits_model).status_code == 201
    failing, passing = [client.post("/deletion-requests", headers=admin,
                                    json=request_body(digits, external_id=f"subject-{c}", forget_class=c)).json()["id"]
                        for c in ("3", "5")]
    batch = claim_batch(backend.settings, model_id_of(backend), "w1")
    reason = "forgetting did not generalise: 33.3% of 3 held-back forget images still recognised (gate 30.0%)"
    report = {"classes": ["3", "5"], "target_met": True, "forget_acc_before": {"3": 100.0, "5": 100.0},
              "forget_acc_after": {"3": 0.0, "5": 0.0}, "forget_set_size": {"3": 3, "5": 9},
              "holdout": {"folds": 3, "folds_run": 3, "held_back": {"3": 3, "5": 9},
                          "forget_acc": {"3": 33.3, "5": 0.0}, "not_recognised": {"3": 0, "5": 0}},
              "rechecks": {"7": {"status": "unverifiable"}}}
    result = BatchResult(report, {}, None, GateVerdict(per_class={"3": [reason], "5": []}), {},
                         request_classes={failing: "3", passing: "5"})
    finish(backend.settings, batch, "w1", rejected={}, runnable=batch.requests, result=result)
    with session_scope(backend.settings.database) as session:
        rows = [session.get(DeletionRequest, i) for i in (failing, passing)]
        assert [(r.status, r.run_alone, r.error) for r in rows] == [(S.QUEUED, True, None)] * 2
        assert reason in rows[0].events[-1].detail["reason"]  # why it runs again, in its trail

    alone = claim_batch(backend.settings, model_id_of(backend), "w1")
    assert list(alone.requests) == [failing]
    report_alone = {**report, "classes": ["3"]}
    finish(backend.settings, alone, "w1", rejected={}, runnable=alone.requests,
           result=BatchResult(report_alone, {}, None, GateVerdict(per_class={"3": [reason]}), {},
                              request_classes={failing: "3"}))
    with session_scope(backend.settings.database) as session:
        failed = session.get(DeletionRequest, failing)
        assert (failed.status, failed.error) == (S.FAILED, reason)
        # Its evidence is its own class's: not the other person's figures, nor earlier people's re-checks.
        assert failed.metrics["classes"] == ["3"] and failed.metrics["holdout"]["forget_acc"] == {"3": 33.3}
        assert "5" not in str(failed.metrics["forget_set_size"]) and "rechecks" not in failed.metrics


def test_of_two_requests_for_one_class_the_one_whose_own_set_is_still_recognised_runs_again_alone(
        backend, client, admin, digits, digits_model):
    assert register_digits(client, admin, digits_model).status_code == 201
    images, halves = split_forget_set(digits, backend, "3")
    first, second = [client.post("/deletion-requests", headers=admin,
                                 json=request_body(digits, external_id=f"subject-{i}", uri=f"file://{h}")).json()["id"]
                     for i, h in enumerate(halves)]
    batch = claim_batch(backend.settings, model_id_of(backend), "w1")
    reason = "its own forget set is still 12.5% recognised (target 1.0%)"
    report = {"classes": ["3"], "target_met": True, "forget_acc_after": {"3": 0.9}}
    result = BatchResult(report, {}, None, GateVerdict(per_class={"3": []}, per_request={first: [reason]}), {},
                         request_classes={first: "3", second: "3"})
    finish(backend.settings, batch, "w1", rejected={}, runnable=batch.requests, result=result)
    with session_scope(backend.settings.database) as session:
        rows = [session.get(DeletionRequest, i) for i in (first, second)]
        assert [(r.status, r.run_alone, r.error) for r in rows] == [(S.QUEUED, True, None)] * 2
        assert reason in rows[0].events[-1].detail["reason"]


def test_a_run_past_lethe_run_timeout_fails_its_request_with_that_reason(backend, client, admin, digits, digits_model):
    assert register_digits(client, admin, digits_model).status_code == 201
    request_id = client.post("/deletion-requests", headers=admin, json=request_body(digits)).json()["id"]
    hasty = backend.settings.model_copy(update={"run_timeout": 0.001})
    run_batch(hasty, claim_batch(hasty, model_id_of(backend), "w1"), "w1")
    with session_scope(backend.settings.database) as session:
        row = session.get(DeletionRequest, request_id)
        assert row.status == S.FAILED
        assert row.error == "the run took longer than LETHE_RUN_TIMEOUT (0.001 s)"
        model = session.get(RegisteredModel, row.model_id)
        assert model.current_version.version == 1  # nothing published


def test_a_fifo_named_like_an_archive_is_rejected_at_once_and_the_run_goes_on(backend, client, admin, digits,
                                                                             digits_model):
    # It used to hang the run for minutes: opening a FIFO waits for a writer that never comes.
    assert register_digits(client, admin, digits_model).status_code == 201
    fifo = digits.root / f"fifo-{backend.name}.tar"
    fifo.unlink(missing_ok=True)
    os.mkfifo(fifo)
    stuck = client.post("/deletion-requests", headers=admin,
                        json=request_body(digits, "fifo", uri=f"file://{fifo}")).json()["id"]
    fine = client.post("/deletion-requests", headers=admin, json=request_body(digits, "fine", forget_class="5")).json()["id"]
    started = time.monotonic()
    run_batch(backend.settings, claim_batch(backend.settings, model_id_of(backend), "w1"), "w1")
    assert time.monotonic() - started < 120
    with session_scope(backend.settings.database) as session:
        rejected, completed = session.get(DeletionRequest, stuck), session.get(DeletionRequest, fine)
        assert rejected.status == S.REJECTED and "not a regular file" in rejected.error
        assert completed.status == S.PROPAGATED, completed.error
