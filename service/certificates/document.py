"""What a deletion certificate states, built from the records of one completed (or propagated) request.

Every figure says where it was measured: the request's own forget set, the audit half of the
model's evaluation set (the selection half only chose the checkpoint), or held-back folds of the
forget set (the generalisation check). Nothing here is computed anew: the certificate restates
what the run recorded, the registry and the audit chain, so an auditor can check each statement
against those records.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.certificates.verify import STATEMENTS_TYPE
from service.consumers.propagation import confirmations
from service.deletion_requests import audit_chain
from service.deletion_requests.models import AuditEvent, DeletionRequest
from service.deletion_requests.personal_data import CLASS, commitment
from service.registry.models import ModelVersion


def statements(session: Session, row: DeletionRequest, issuer: str) -> dict[str, Any]:
    """The certificate's statements for a completed request (its id and issue time are added when signed)."""
    metrics = row.metrics or {}
    fulfilled = session.get(ModelVersion, row.fulfilled_version_id)
    own = metrics.get("own_forget_set") or {}
    return {
        "type": STATEMENTS_TYPE,
        "iss": issuer,
        "sub": row.id,
        "request": {
            "id": row.id, "external_id": row.external_id, "received_at": _time(row.received_at),
            "due_at": _time(row.due_at), "completed_at": _time(row.finished_at),
            "propagated_at": _time(row.propagated_at), "extended_days": row.extended_days,
        },
        "model": row.model.name,
        # Redacted: the class is no longer on record; the commitment lets the holder of an earlier
        # certificate (which carries the nonce) show it was theirs.
        "forgotten_class": None if row.redacted_at else row.forget_class,
        "subject_commitment": _commitment(row),
        "forget_set": {"images": own.get("images"), "sha256": own.get("sha256"),
                       "digest_rule": "sha256 over the sorted, distinct lowercase hex sha256 of each image file, "
                                      "each followed by a newline"},
        "versions": _versions(session, row, fulfilled, metrics),
        "serving": _serving(session, row),
        "method": ({"name": metrics.get("method"), "config": metrics.get("config")}
                   if not metrics.get("already_forgotten") else None),
        "evidence": evidence(metrics, CLASS if row.redacted_at else row.forget_class),  # redaction re-keys metrics
        "gate": {"passed": True, "thresholds": metrics.get("gate_thresholds")},  # None: a run before they were recorded
        "audit_chain": {
            "head_sha256": audit_chain.head(session, row.id),
            "events": session.scalar(select(func.count()).select_from(AuditEvent)
                                     .where(AuditEvent.request_id == row.id, AuditEvent.sha256.is_not(None))),
        },
    }


def evidence(metrics: dict[str, Any], cls: str) -> dict[str, Any]:
    """The run's figures for this request's class, each with the set it was measured on and its size."""
    own = metrics.get("own_forget_set") or {}
    if metrics.get("already_forgotten"):
        return {"already_forgotten": True,
                "forget_set": {"measured_on": "the request's own forget set", "images": own.get("images"),
                               "accuracy": metrics.get("forget_acc"), "version": metrics.get("version")}}
    found: dict[str, Any] = {
        "forget_set": {"measured_on": "the request's own forget set", "images": own.get("images"),
                       "accuracy_before": own.get("forget_acc_before"), "accuracy_after": own.get("forget_acc_after")},
    }
    if (metrics.get("config") or {}).get("reset_head_rows"):
        # The new version's head row of the class is the mean of the kept rows: it never predicts the
        # class, so the figures above would be 0 % whatever its features hold. These are the trained
        # network's, read by the class's own row before the reset: what the gate judged.
        trained_by_class = (metrics.get("evaluation") or {}).get("per_class_trained") or {}
        found["head_row_reset"] = {
            "rule": "the class's head row set to the mean of the kept classes' rows after training",
            "forget_set_accuracy_before_reset": own.get("forget_acc_trained"),  # the request's own set's
            "evaluation_class_accuracy_before_reset": trained_by_class.get(cls),
        }
    evaluation = metrics.get("evaluation")
    if evaluation:
        found["evaluation"] = {
            "measured_on": _measured_on(evaluation.get("half", "whole")),
            "half": evaluation.get("half", "whole"), "images": evaluation["images"],
            "class_images": (evaluation.get("per_class_images") or {}).get(cls),  # None: a run before they were recorded
            "class_accuracy_before": (evaluation.get("per_class_before") or {}).get(cls),
            "class_accuracy_after": (evaluation.get("per_class_after") or {}).get(cls),
            "retained_accuracy_before": evaluation.get("acc_r_before"),
            "retained_accuracy_after": evaluation.get("acc_r_after"),
            "cumulative_retain_drop": metrics.get("cumulative_retain_drop"),
        }
    selection = metrics.get("selection")
    if selection:
        found["checkpoint_selection"] = {"half": selection.get("half"), "images": selection.get("images"),
                                         "step": selection.get("step")}
        if "selected_by" in selection:  # runs before it was recorded keep the statements they were signed with
            found["checkpoint_selection"]["selected_by"] = selection["selected_by"]
    holdout = metrics.get("holdout")
    if holdout:
        found["generalisation_check"] = {
            "measured_on": "held-back folds of the forget set, each scored by a model that never trained on them",
            "folds": holdout.get("folds"), "folds_run": holdout.get("folds_run"), "seed": holdout.get("seed"),
            "held_back": (holdout.get("held_back") or {}).get(cls),
            "accuracy": (holdout.get("forget_acc") or {}).get(cls),
        }
    residual = (metrics.get("residual_knowledge") or {}).get(cls)
    if residual:  # "before": the parent version, "after": the new one
        where = _measured_on(residual.get("measured_on", "whole"))
        found["residual_knowledge"] = {name: {**residual[name], "measured_on": where}
                                       for name in ("probe", "mia", "relearn") if name in residual}
    return found


def _measured_on(half: str) -> str:
    return f"the {half} half of the model's evaluation set" if half != "whole" else "the model's whole evaluation set"


def _versions(session: Session, row: DeletionRequest, fulfilled: ModelVersion, metrics: dict[str, Any]) -> dict[str, Any]:
    """The version that forgot the class, the one it was made from, and every earlier version that
    still holds the class, with when its weights were deleted (None: still stored)."""
    earlier = session.scalars(select(ModelVersion).where(
        ModelVersion.model_id == row.model_id, ModelVersion.version < fulfilled.version)
        .order_by(ModelVersion.version)).all()
    # Once redacted, the class is unknown: every earlier version counts as holding it (an overstatement
    # only for a request its version had already forgotten).
    holding = [v for v in earlier if row.redacted_at or row.forget_class not in (v.classes_forgotten or [])]
    parent_sha256 = metrics.get("parent_sha256")
    parent = next((v for v in reversed(earlier) if v.sha256 == parent_sha256), None)
    return {
        "forgotten_in": _version(fulfilled),
        "made_from": _version(parent) if parent is not None and not metrics.get("already_forgotten") else None,
        "earlier_holding_the_class": [{**_version(v), "weights_deleted_at": _time(v.disposed_at)} for v in holding],
        "every_earlier_copy_deleted": all(v.disposed_at is not None for v in holding),
    }


def _serving(session: Session, row: DeletionRequest) -> dict[str, Any]:
    """Which inference services acknowledged serving a version without the class: as recorded when
    the request propagated (the audit event's), or, until then, each live consumer's state now."""
    if row.propagated_at is not None:
        event = session.scalar(select(AuditEvent).where(AuditEvent.request_id == row.id,
                                                        AuditEvent.event == "status:propagated"))
        detail = event.detail if event is not None and event.detail else {}
        # A consumer that went back to an older version after that serves the class again: said too.
        again = session.scalars(select(AuditEvent).where(AuditEvent.request_id == row.id,
                                                         AuditEvent.event == "served_again")
                                .order_by(AuditEvent.id)).all()
        return {"propagated": True, "consumers": detail.get("consumers", []), "note": detail.get("note"),
                "served_again": [{**(e.detail or {}), "at": _time(e.at)} for e in again]}
    return {"propagated": False, "consumers": [c.to_dict() for c in confirmations(session, row)], "note": None,
            "served_again": []}


def _commitment(row: DeletionRequest) -> dict[str, Any] | None:
    if row.redacted_at is not None:
        return {"sha256": row.subject_commitment, "redacted_at": _time(row.redacted_at)}
    if row.subject_nonce is None:  # a request from before nonces: nothing to commit to
        return None
    return {"sha256": commitment(row.subject_nonce, row.forget_class, row.forget_uri), "nonce": row.subject_nonce,
            "rule": "sha256 over the nonce, the class and the forget set's URI, each followed by a newline"}


def _version(version: ModelVersion) -> dict[str, Any]:
    return {"version": version.version, "sha256": version.sha256}


def _time(value) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None
