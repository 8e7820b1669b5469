"""The publish gate: what a candidate must show before it may be published as forgotten."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select

from service.config import Settings
from service.db import session_scope
from service.registry.models import ModelVersion
from worker.runs.batch import Batch


@dataclass
class GateVerdict:
    """Why a candidate may not be published: reasons of the whole candidate (``batch``) and reasons
    of one class's requests (``per_class``). No reason names a class: class names are often people's."""

    batch: list[str] = field(default_factory=list)
    per_class: dict[str, list[str]] = field(default_factory=dict)
    per_request: dict[str, list[str]] = field(default_factory=dict)  # e.g. a request's own forget set

    @property
    def passed(self) -> bool:
        return not self.batch and not any(self.per_class.values()) and not any(self.per_request.values())

    def own_reasons(self, request_id: str, cls: str) -> list[str]:
        return self.per_class.get(cls, []) + self.per_request.get(request_id, [])

    def reasons(self) -> list[str]:
        """Every reason, for the log."""
        return (self.batch + [r for reasons in self.per_class.values() for r in reasons]
                + [r for reasons in self.per_request.values() for r in reasons])


def thresholds(settings: Settings, target: float) -> dict[str, float | None]:
    """The limits a candidate is judged by, recorded with the run (a certificate states the ones it passed,
    not whatever the settings say later)."""
    return {
        "forget_set_accuracy_max": target,
        "evaluation_class_accuracy_max": settings.gate_max_eval_forget_acc,
        "cumulative_retain_drop_max": settings.gate_max_retain_drop,
        "generalisation_check_accuracy_max": settings.gate_max_holdout_forget_acc if settings.gate_holdout_folds else None,
        "probe_accuracy_max": settings.gate_max_probe_acc,
        "mia_accuracy_max": settings.gate_max_mia_acc,
        "relearn_accuracy_max": settings.gate_max_relearn_acc,
    }


def gate_errors(settings: Settings, batch: Batch, report: dict[str, Any], target: float,
                requested: set[str]) -> GateVerdict:
    """The gate. The generalisation check and the forget-set target judge each of the batch's own
    classes (``requested``) apart; an earlier class forgotten again is judged by its re-check."""
    verdict = GateVerdict(per_class={c: [] for c in requested})
    report["gate_thresholds"] = thresholds(settings, target)
    errors = verdict.batch
    # The trained network's figures: with its rows reset (reset_head_rows) the candidate itself puts
    # every forget set at 0 %, whether or not its features still hold the class.
    for cls, acc in report.get("forget_acc_trained", report["forget_acc_after"]).items():
        if acc > target:
            reason = f"forget-set accuracy {acc:.1f}% did not reach the {target}% target"
            (verdict.per_class[cls] if cls in requested else errors).append(reason)
    not_forgotten = [c for c, r in report.get("rechecks", {}).items() if r["status"] == "not_forgotten"]
    if not_forgotten:
        errors.append(f"{len(not_forgotten)} class(es) forgotten by earlier requests would no longer be forgotten")
    for cls in requested:
        verdict.per_class[cls] += holdout_errors(settings, report.get("holdout"), {cls})
        verdict.per_class[cls] += residual_errors(settings, (report.get("residual_knowledge") or {}).get(cls))
    evaluation = report.get("evaluation")
    if evaluation:
        acc_f = evaluation["acc_f_after"] if evaluation.get("acc_f_trained") is None else evaluation["acc_f_trained"]
        if acc_f > settings.gate_max_eval_forget_acc:
            errors.append(f"held-out Acc_f {acc_f:.1f}% exceeds {settings.gate_max_eval_forget_acc}%")
        drop = cumulative_retain_drop(settings, batch, evaluation, forgotten=set(report["classes"]))
        report["cumulative_retain_drop"] = drop
        if drop > settings.gate_max_retain_drop:
            errors.append(f"cumulative Acc_r drop {drop:.1f} points exceeds {settings.gate_max_retain_drop}")
    return verdict


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
            errors.append("the generalisation check could not score any held-back image (it needs at least 2 "
                          "different photos of the class that the model recognises; at least 3 give a fair chance)")
        elif acc > settings.gate_max_holdout_forget_acc:
            errors.append(f"forgetting did not generalise: {acc:.1f}% of {holdout['held_back'][cls]} held-back forget "
                          f"images still recognised (gate {settings.gate_max_holdout_forget_acc}%)")
    return errors


def residual_errors(settings: Settings, found: dict[str, Any] | None) -> list[str]:
    """The residual-knowledge gates (each off unless set): the lower ends of the 95 % intervals of the
    new version's probe accuracy and of its membership attack (a person's few photos give wide
    intervals, and a point estimate would fail runs on noise), and its accuracy after k-shot
    fine-tuning."""
    if not found:
        return []
    checks = [
        (settings.gate_max_probe_acc, (found["probe"].get("after_interval") or (None,))[0],
         "a linear probe on its features still finds the class (95% interval from {value:.1f}%, gate {limit}%)"),
        (settings.gate_max_mia_acc, (found["mia"].get("after_interval") or (None,))[0],
         "a membership attack still tells its forget images from unseen ones (95% interval from {value:.1f}%, "
         "gate {limit}%)"),
        (settings.gate_max_relearn_acc, found["relearn"].get("after"), "{k}-shot fine-tuning gives the class back "
                                                                       "({value:.1f}%, gate {limit}%)"),
    ]
    return [message.format(value=value, limit=limit, k=found["relearn"].get("k"))
            for limit, value, message in checks if limit is not None and value is not None and value > limit]


def cumulative_retain_drop(settings: Settings, batch: Batch, evaluation: dict[str, Any], forgotten: set[str]) -> float:
    """Mean per-class accuracy of version 1 minus the candidate's, over the classes still retained."""
    with session_scope(settings.database) as session:
        first = session.scalar(select(ModelVersion).where(ModelVersion.model_id == batch.model_id,
                                                          ModelVersion.version == 1))
        base = (first.metrics or {}).get("per_class_accuracy")
        if base is None:  # the first run measures version 1 as its "before" (on the audit half, as every run)
            base = evaluation["per_class_before"]
            first.metrics = {**(first.metrics or {}), "per_class_accuracy": base,
                             "per_class_accuracy_half": evaluation.get("half", "whole")}
    gone = forgotten | set(batch.forgotten_earlier)
    retained = [c for c, acc in evaluation["per_class_after"].items()
                if c not in gone and acc is not None and base.get(c) is not None]
    if not retained:
        return 0.0
    before = sum(base[c] for c in retained) / len(retained)
    after = sum(evaluation["per_class_after"][c] for c in retained) / len(retained)
    return round(before - after, 3)
