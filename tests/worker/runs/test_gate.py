"""The publish gate's generalisation check: held-back forget images must be forgotten too."""

from __future__ import annotations

from service.config import Settings
from worker.runs.gate import holdout_errors


def holdout(acc: float | None, held_back: int) -> dict:
    return {"folds": 3, "folds_run": 3, "held_back": {"subject03": held_back}, "forget_acc": {"subject03": acc},
            "steps": [4, 5, 4], "seconds": 1.0}


def test_held_back_images_still_recognised_above_the_gate_fail_the_run():
    settings = Settings(gate_max_holdout_forget_acc=30.0)
    (error,) = holdout_errors(settings, holdout(33.3, 9))
    assert error.startswith("forgetting did not generalise: 33.3% of 9 held-back forget images")
    assert "subject03" not in error  # a class name is often a person's name


def test_at_the_gate_or_below_the_run_passes():
    settings = Settings(gate_max_holdout_forget_acc=30.0)
    assert holdout_errors(settings, holdout(30.0, 9)) == holdout_errors(settings, holdout(0.0, 9)) == []


def test_a_forget_set_the_check_could_not_score_fails_the_run():
    (error,) = holdout_errors(Settings(), holdout(None, 0))
    assert "could not score any held-back image" in error and "at least 2 different photos" in error


def test_the_gate_judges_each_of_the_batchs_classes_apart_and_names_none():
    from worker.runs.gate import gate_errors

    report = {"target_met": True, "forget_acc_after": {"subject03": 0.0, "subject07": 0.0},
              "holdout": {"folds": 3, "folds_run": 3, "held_back": {"subject03": 3, "subject07": 9},
                          "forget_acc": {"subject03": 33.3, "subject07": 0.0}},
              "rechecks": {"subject01": {"status": "not_forgotten"}}}
    verdict = gate_errors(Settings(gate_max_holdout_forget_acc=30.0), batch=None, report=report, target=1.0,
                          requested={"subject03", "subject07"})
    assert verdict.per_class["subject07"] == [] and len(verdict.per_class["subject03"]) == 1
    assert verdict.batch == ["1 class(es) forgotten by earlier requests would no longer be forgotten"]
    assert not verdict.passed and {c for c, r in verdict.per_class.items() if r} == {"subject03"}
    assert not any("subject" in reason for reason in verdict.reasons())


def test_no_check_no_error():
    assert holdout_errors(Settings(), None) == []
