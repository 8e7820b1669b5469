"""The publish gate: what a candidate must show before it may be published as forgotten."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from service.config import Settings
from service.db import session_scope
from service.registry.models import ModelVersion
from worker.runs.batch import Batch


def gate_errors(settings: Settings, batch: Batch, report: dict[str, Any], target: float,
                requested: set[str]) -> list[str]:
    """Why the candidate may not be published (empty: it may). The generalisation check judges the
    batch's own classes (``requested``): an earlier class forgotten again is judged by its re-check."""
    errors = []
    if not report["target_met"]:
        worst = max(report["forget_acc_after"].values())
        errors.append(f"forget-set accuracy {worst:.1f}% did not reach the {target}% target")
    not_forgotten = [c for c, r in report.get("rechecks", {}).items() if r["status"] == "not_forgotten"]
    if not_forgotten:
        errors.append(f"earlier classes no longer forgotten: {', '.join(not_forgotten)}")
    errors += holdout_errors(settings, report.get("holdout"), requested)
    evaluation = report.get("evaluation")
    if evaluation:
        if evaluation["acc_f_after"] > settings.gate_max_eval_forget_acc:
            errors.append(f"held-out Acc_f {evaluation['acc_f_after']:.1f}% exceeds "
                          f"{settings.gate_max_eval_forget_acc}%")
        drop = cumulative_retain_drop(settings, batch, evaluation, forgotten=set(report["classes"]))
        report["cumulative_retain_drop"] = drop
        if drop > settings.gate_max_retain_drop:
            errors.append(f"cumulative Acc_r drop {drop:.1f} points exceeds {settings.gate_max_retain_drop}")
    return errors


def holdout_errors(settings: Settings, holdout: dict[str, Any] | None, classes: set[str] | None = None) -> list[str]:
    """The generalisation check: held-back forget images, never trained on, must be forgotten too.
    A set too small to hold any image back cannot show that, so it fails too: a run that forgot
    one photo has not shown it forgot the person."""
    if not holdout:
        return []
    errors = []
    for cls, acc in holdout["forget_acc"].items():
        if classes is not None and cls not in classes:
            continue
        if acc is None:
            errors.append(f"forget set too small for the generalisation check ({holdout['held_back'][cls]} image(s) "
                          "held back; send at least 2 images)")
        elif acc > settings.gate_max_holdout_forget_acc:
            errors.append(f"forgetting did not generalise: {acc:.1f}% of {holdout['held_back'][cls]} held-back forget "
                          f"images still recognised (gate {settings.gate_max_holdout_forget_acc}%)")
    return errors


def cumulative_retain_drop(settings: Settings, batch: Batch, evaluation: dict[str, Any], forgotten: set[str]) -> float:
    """Mean per-class accuracy of version 1 minus the candidate's, over the classes still retained."""
    with session_scope(settings.database) as session:
        first = session.scalar(select(ModelVersion).where(ModelVersion.model_id == batch.model_id,
                                                          ModelVersion.version == 1))
        base = (first.metrics or {}).get("per_class_accuracy")
        if base is None:  # the first run measures version 1 as its "before"
            base = evaluation["per_class_before"]
            first.metrics = {**(first.metrics or {}), "per_class_accuracy": base}
    gone = forgotten | set(batch.forgotten_earlier)
    retained = [c for c, acc in evaluation["per_class_after"].items()
                if c not in gone and acc is not None and base.get(c) is not None]
    if not retained:
        return 0.0
    before = sum(base[c] for c in retained) / len(retained)
    after = sum(evaluation["per_class_after"][c] for c in retained) / len(retained)
    return round(before - after, 3)
