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


def test_a_forget_set_too_small_to_check_fails_the_run():
    (error,) = holdout_errors(Settings(), holdout(None, 0))
    assert "too small for the generalisation check" in error and "at least 2" in error


def test_no_check_no_error():
    assert holdout_errors(Settings(), None) == []
