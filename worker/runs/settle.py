"""Settling a batch: publish version n+1 and complete its requests, or fail, cancel or re-queue
them; always inside ``settling``, so a worker that lost its lease writes nothing."""

from __future__ import annotations

import json
import logging
import shutil
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any


from service.config import Settings
from service.consumers.propagation import propagate
from service.deletion_requests.models import DeletionRequest, RequestStatus as S
from service.deletion_requests.transitions import record, transition
from service.registry.models import ModelVersion
from service.registry.service import publish_version
from service.registry.storage import artifact_store
from worker.runs.batch import Batch
from worker.runs.leases import back_to_queue, settling
from worker.runs.train import BatchResult

if TYPE_CHECKING:
    from worker.engine.timings import Timings

log = logging.getLogger("lethe.worker")


def finish(settings: Settings, batch: Batch, worker_id: str, rejected: dict[str, str],
           runnable: dict[str, tuple[str, str, int]], result: BatchResult | None, timings: Timings | None = None) -> None:
    actor = f"worker:{worker_id}"
    phase = timings.phase if timings is not None else (lambda name: nullcontext())
    sha256 = size = card = None
    if result is not None and result.package is not None and result.gate.passed:
        with phase("store candidate"):
            store = artifact_store(settings)
            incoming = store.new_incoming()
            shutil.move(result.package / "model.safetensors", incoming)
            sha256, size = store.put(incoming)
            card = json.loads((result.package / "model.json").read_text())
    with phase("settle"), settling(settings, batch, worker_id, publishing=sha256 is not None) as held:
        if held is not None:
            session, rows = held
            for request_id, reason in rejected.items():
                if request_id in rows:
                    transition(session=session, request=rows[request_id], to=S.REJECTED, actor=actor,
                               detail={"error": reason})
                    rows[request_id].error = reason
            if result is not None and any(rows[r].cancel_requested for r in runnable.keys() & rows.keys()):
                # A cancel that arrived after the last step: it was acknowledged, so it wins over the
                # result (this lock orders it against the cancel's own). Nothing is published.
                cancel_held(session, {r: row for r, row in rows.items() if r not in rejected}, actor)
            elif result is not None:
                settle_result(session, batch, rows, runnable, result, sha256, size, card, actor)
    # A fenced-out or canceled run's stored candidate is left to the orphan sweep: the same bytes may
    # be what the worker that took over stores and is about to name (runs are reproducible).


def settle_result(session, batch: Batch, rows: dict[str, DeletionRequest], runnable, result: BatchResult,
                  sha256: str | None, size: int | None, card: dict[str, Any] | None, actor: str) -> None:
    current = session.get(ModelVersion, batch.version_id)
    if result.report is not None and not result.gate.passed:
        settle_gate_failure(session, batch, rows, runnable, result, actor)
        return
    fulfilled = current
    if result.report is not None:
        forgotten = list(dict.fromkeys([*current.classes_forgotten, *result.report["classes"]]))
        fulfilled = publish_version(session=session, model_id=batch.model_id, sha256=sha256, size=size,
                                    card=card, classes_forgotten=forgotten, metrics=summarise(result.report))
        # No class name in the log: a class is often a person, and the requests name them to who may read them.
        log.info("model %s: version %d published, forgetting %d class(es)", batch.model_name, fulfilled.version,
                 len(result.report["classes"]),
                 extra={"model": batch.model_name, "published_version": fulfilled.version, "sha256": sha256,
                        "deletion_requests": list(runnable), "training_seconds": result.report.get("seconds")})
    for request_id, (cls, _uri, _seed) in runnable.items():
        row = rows.get(request_id)
        if row is None:  # no longer this worker's: whoever runs it now settles it
            continue
        if cls in result.already_forgotten:
            record(session=session, request=row, event="already_forgotten", actor=actor,
                   detail={"version": current.version, "forget_acc": result.already_forgotten[cls]})
            row.metrics = {"already_forgotten": True, "forget_acc": result.already_forgotten[cls],
                           "version": current.version, "own_forget_set": result.own_sets.get(request_id, {})}
        else:
            row.metrics = request_metrics(result, request_id)
        row.fulfilled_version_id = fulfilled.id
        transition(session=session, request=row, to=S.COMPLETED, actor=actor, detail={"version": fulfilled.version})
    # Done when every consumer serves it: at once for a model with none, or with one that already
    # serves this version (an already-forgotten class).
    propagate(session=session, model_id=batch.model_id, actor=actor)


def settle_gate_failure(session, batch: Batch, rows: dict[str, DeletionRequest], runnable, result: BatchResult,
                        actor: str) -> None:
    """The candidate may not be published. A request fails only on a run of its own: in a batch,
    every request goes back to the queue to run alone, those that passed (another's failure must
    not fail, or show in, theirs) and those that did not (forgetting several people at once shares
    one training budget: on this AVX-512 machine a class of a 5-class batch ended at 1.8 % against a
    1 % target that the same images reach alone). Alone, it fails with its class's reasons, its own
    set's and the whole candidate's."""
    gate = result.gate
    log.warning("model %s: the candidate missed the publish gate: %s", batch.model_name, "; ".join(gate.reasons()),
                extra={"model": batch.model_name, "gate": gate.reasons()})
    alone = len(runnable) == 1
    for request_id in runnable.keys() & rows.keys():
        row, cls = rows[request_id], runnable[request_id][0]
        own = gate.own_reasons(request_id, cls)
        if alone:
            reasons = own + gate.batch
            transition(session=session, request=row, to=S.FAILED, actor=actor, detail={"gate": reasons})
            row.error, row.metrics = "; ".join(reasons), request_metrics(result, request_id)
        elif own:
            back_to_queue(session, row, actor, f"it missed the gate in a batch of {len(runnable)} "
                          f"({'; '.join(own)}); a request fails only on a run of its own", alone=True)
        else:
            back_to_queue(session, row, actor, "another request of its batch missed the gate", alone=True)


def request_metrics(result: BatchResult, request_id: str) -> dict[str, Any]:
    """The run's evidence as this request may see it: its own class's figures only (the batch's
    other classes are other people), and its own forget set measured apart from its class's union."""
    cls = result.request_classes.get(request_id)
    metrics = own_class_only(summarise(result.report), cls)
    if request_id in result.own_after:
        metrics["own_forget_set"] = {**result.own_sets.get(request_id, {}),
                                     "forget_acc_before": result.own_before[request_id],
                                     "forget_acc_after": result.own_after[request_id],
                                     "forget_acc_trained": result.own_trained.get(request_id)}
    return metrics


PER_CLASS = ("forget_set_size", "forget_acc_before", "forget_acc_after", "forget_acc_trained", "forget_duplicates",
             "forget_set_sha256", "residual_knowledge")


def own_class_only(metrics: dict[str, Any], cls: str | None) -> dict[str, Any]:
    """``metrics`` with every per-class figure narrowed to ``cls``; no re-checks of earlier classes
    (those are the version's evidence, on the model's page)."""
    narrowed = {k: v for k, v in metrics.items() if k != "rechecks"}
    narrowed["classes"] = [cls] if cls is not None else []
    for key in PER_CLASS:
        if isinstance(metrics.get(key), dict):
            narrowed[key] = {c: v for c, v in metrics[key].items() if c == cls}
    for key in ("holdout", "feature_term"):  # figures per class inside a record of the run
        if metrics.get(key):
            narrowed[key] = {k: ({c: x for c, x in v.items() if c == cls} if isinstance(v, dict) else v)
                             for k, v in metrics[key].items()}
    return narrowed


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    keep = ("method", "config", "classes", "forget_set_size", "steps", "seconds", "forget_acc_before",
            "forget_acc_after", "forget_acc_trained", "target_met", "stop_rule_met", "evaluation", "cumulative_retain_drop", "parent_sha256",
            "trainable_parameters", "peak_memory_bytes", "device", "precision", "rechecks", "holdout",
            "anchor_images", "synthetic_anchor_images", "feature_term", "forget_duplicates", "forget_set_sha256", "gate_thresholds", "residual_knowledge",
            "timings")
    summary = {k: report[k] for k in keep if k in report}
    selection = report.get("selection")
    if selection:  # which half chose the checkpoint, not every evaluation along the way
        summary["selection"] = {"half": selection.get("half"), "images": selection.get("images"),
                                "step": (selection.get("best") or {}).get("step"),
                                "selected_by": selection.get("selected_by")}
    return summary


def settle_failure(settings: Settings, batch: Batch, worker_id: str, error: str) -> None:
    """A run that raised. Alone, its request fails with the error. In a batch, the cause may be one
    request's images or class: every request goes back to the queue to run alone, so that only the
    one that causes the failure fails (and the others are not held back by it)."""
    with settling(settings, batch, worker_id) as held:
        rows = list(held[1].values()) if held else []
        for row in rows:
            if len(rows) == 1:
                transition(session=held[0], request=row, to=S.FAILED, actor=f"worker:{worker_id}",
                           detail={"error": error})
                row.error = error
            else:  # the reason goes into this request's trail: no other request's class or forget set
                back_to_queue(held[0], row, f"worker:{worker_id}",
                              f"its batch of {len(rows)} failed ({batch.scrubbed(error)})", alone=True)


def settle_cancellation(settings: Settings, batch: Batch, worker_id: str) -> None:
    with settling(settings, batch, worker_id) as held:
        if held is not None:
            cancel_held(held[0], held[1], f"worker:{worker_id}")


def cancel_held(session, rows: dict[str, DeletionRequest], actor: str) -> None:
    """Canceled requests end; the others of the batch go back to the queue for the next run."""
    for row in rows.values():
        to = S.CANCELED if row.cancel_requested else S.QUEUED
        transition(session=session, request=row, to=to, actor=actor,
                   detail={"reason": "canceled during the run" if to == S.CANCELED else "batch canceled"})
