"""The publish gate: what a candidate must show before it may be published as forgotten."""

from __future__ import annotations

import math
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


def thresholds(settings: Settings, target: float) -> dict[str, Any]:
    """The limits a candidate is judged by, recorded with the run (a certificate states the ones it passed,
    not whatever the settings say later)."""
    return {
        "forget_set_accuracy_max": target,
        "evaluation_class_accuracy_max": settings.gate_max_eval_forget_acc,
        "cumulative_retain_drop_max": settings.gate_max_retain_drop,
        "generalisation_check_accuracy_max": settings.gate_max_holdout_forget_acc if settings.gate_holdout_folds else None,
        "probe_accuracy_max": settings.gate_max_probe_acc,
        "mia_accuracy_max": settings.gate_max_mia_acc,
        # How the two above are judged, so that a certificate's verdict can be checked from its own figures.
        "probe_and_mia_judged_by": "the lower end of the 95% Wilson interval; undecidable at the images given: failed",
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
    fine-tuning. A set gate that its measure cannot decide fails the run, as the generalisation
    check does: one that did not run, or whose images are too few for any result to exceed it
    (then a pass would say nothing). The reason says how many images it would take."""
    if not found:
        return []
    probe, mia, relearn = found["probe"], found["mia"], found["relearn"]
    errors = _interval_gate(
        settings.gate_max_probe_acc, "LETHE_GATE_MAX_PROBE_ACC", "the probe", probe.get("after_interval"),
        trials=probe.get("images") or 0, per_trial="audit images of the class",
        failed="a linear probe on its features still finds the class (95% interval from {low:.1f}%, gate {limit}%)")
    errors += _interval_gate(
        settings.gate_max_mia_acc, "LETHE_GATE_MAX_MIA_ACC", "the membership attack", mia.get("after_interval"),
        trials=2 * (mia.get("images_per_side") or 0), per_trial="guesses (2 per image a side)",
        failed="a membership attack still tells its forget images from unseen ones (95% interval from {low:.1f}%, "
               "gate {limit}%)")
    limit, value = settings.gate_max_relearn_acc, relearn.get("after")
    if limit is not None and value is not None and value > limit:
        errors.append(f"{relearn.get('k')}-shot fine-tuning gives the class back ({value:.1f}%, gate {limit}%)")
    return errors


def _interval_gate(limit: float | None, setting: str, measure: str, interval: list[float] | None, *, trials: int,
                   per_trial: str, failed: str) -> list[str]:
    """One gate on a proportion's 95 % Wilson interval: fails when its lower end is above ``limit``,
    and when the measure could not decide it (see residual_errors)."""
    from worker.engine.evidence import Z_95, wilson_interval  # the engine's torch loads in runs, not at import

    if limit is None or limit >= 100.0:  # no lower end exceeds 100 %: a gate there admits every run
        return []
    if interval is None:
        return [f"{measure} gate ({setting}) could not be judged: {measure} did not run on this evaluation set"]
    best_possible = wilson_interval(trials, trials)[0]  # every guess right: the highest the lower end can be
    if best_possible <= limit:
        # All of n right puts the lower end at n / (n + z²): above p once n > z² p / (1 - p).
        needed = math.floor(Z_95 ** 2 * limit / (100.0 - limit)) + 1
        return [f"{measure} gate ({setting}) cannot be decided with {trials} {per_trial}: even all right, its 95% "
                f"interval starts at {best_possible:.1f}%, not above the gate {limit}%; it takes at least {needed} "
                f"(a larger evaluation set), or unset {setting}"]
    return [failed.format(low=interval[0], limit=limit)] if interval[0] > limit else []


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
