"""The publish gate's generalisation check: held-back forget images must be forgotten too."""

from __future__ import annotations

import pytest

from service.config import Settings
from worker.runs.gate import holdout_errors, residual_errors


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


def residual(probe_low: float | None, mia_low: float | None, relearn: float | None, probe_images: int = 500,
             mia_images: int = 250) -> dict:
    return {"probe": {"before": 95.0, "after": 50.0, "images": probe_images,
                      "after_interval": None if probe_low is None else (probe_low, 80.0)},
            "mia": {"after": 60.0, "images_per_side": mia_images,
                    "after_interval": None if mia_low is None else (mia_low, 70.0)},
            "relearn": {"before": 100.0, "after": relearn, "k": 10}}


def test_residual_knowledge_gates_are_off_unless_set():
    assert residual_errors(Settings(), residual(99.0, 99.0, 99.0)) == []
    assert residual_errors(Settings(gate_max_probe_acc=10), None) == []  # no evaluation set: nothing measured


def test_each_residual_gate_fails_a_run_above_its_limit_and_names_no_class():
    settings = Settings(gate_max_probe_acc=20, gate_max_mia_acc=60, gate_max_relearn_acc=30)
    probe, mia, relearn = residual_errors(settings, residual(25.0, 61.0, 40.0))
    assert probe.startswith("a linear probe on its features still finds the class (95% interval from 25.0%, gate 20.0%)")
    assert "95% interval from 61.0%" in mia and relearn.startswith("10-shot fine-tuning gives the class back (40.0%")
    assert residual_errors(settings, residual(20.0, 60.0, 30.0)) == []  # at the limits: passes


def test_the_membership_gate_judges_the_intervals_lower_end_not_the_point():
    """Seven photos give a wide interval: a point estimate of 70 % is no evidence the attack works."""
    settings = Settings(gate_max_mia_acc=60)
    assert residual_errors(settings, residual(None, 45.0, None, mia_images=7)) == []


def test_the_probe_gate_judges_the_intervals_lower_end_not_the_point():
    """Two unseen photos of a person: a probe finding one of them (50 %) is no evidence it finds the person."""
    settings = Settings(gate_max_probe_acc=20)
    assert residual_errors(settings, residual(9.5, None, None, probe_images=2)) == []  # its point is 50 %


@pytest.mark.parametrize("setting, found, needed", [
    # Two photos, all found, give an interval from 34.2 %: a gate at 70 % could never fail. 9 would.
    ({"gate_max_probe_acc": 70}, residual(34.2, None, None, probe_images=2), "it takes at least 9 "),
    # Seven images a side are 14 guesses, from 78.5 % when all are right: not above 80 %. 16 guesses would.
    ({"gate_max_mia_acc": 80}, residual(None, 78.5, None, mia_images=7), "it takes at least 16 "),
])
def test_a_set_gate_its_measure_cannot_decide_fails_and_says_what_it_would_take(setting, found, needed):
    [reason] = residual_errors(Settings(**setting), found)
    assert "cannot be decided" in reason and needed in reason and "a larger evaluation set" in reason


def test_an_interval_gate_at_100_admits_every_run():
    """No interval's lower end exceeds 100 %: the gate cannot fail, and is not taken for undecidable."""
    assert residual_errors(Settings(gate_max_probe_acc=100, gate_max_mia_acc=100),
                           residual(99.0, 99.0, None, probe_images=2, mia_images=1)) == []


@pytest.mark.parametrize("setting, name", [({"gate_max_probe_acc": 70}, "the probe"),
                                           ({"gate_max_mia_acc": 60}, "the membership attack")])
def test_a_set_gate_whose_measure_did_not_run_fails(setting, name):
    """A person with one unseen photo: no probe folds, no attack. A set gate does not pass on no evidence."""
    [reason] = residual_errors(Settings(**setting), residual(None, None, None, probe_images=1, mia_images=1))
    assert reason.startswith(f"{name} gate") and "could not be judged" in reason


def test_with_reset_head_rows_the_gate_judges_the_trained_network_not_the_reset_candidate(monkeypatch):
    """A candidate whose rows were reset puts every forget set and the held-out class at 0 % whatever
    its features hold: the forget-set target and the held-out Acc_f are read before the reset."""
    from worker.runs import gate

    # The Acc_r drop is read from version 1's record in the registry; this test is about Acc_f.
    monkeypatch.setattr(gate, "cumulative_retain_drop", lambda *args, **kwargs: 0.0)

    report = {"target_met": False, "classes": ["subject03"], "forget_acc_after": {"subject03": 0.0},
              "forget_acc_trained": {"subject03": 40.0},
              "evaluation": {"acc_f_after": 0.0, "acc_f_trained": 25.0}}
    settings = Settings(gate_max_eval_forget_acc=5.0, gate_max_retain_drop=100.0)
    verdict = gate.gate_errors(settings, batch=None, report=report, target=1.0, requested={"subject03"})
    assert verdict.per_class["subject03"] == ["forget-set accuracy 40.0% did not reach the 1.0% target"]
    assert "held-out Acc_f 25.0% exceeds 5.0%" in verdict.batch


def test_each_request_is_judged_on_its_own_set_s_trained_figure_among_its_class_s_sources():
    from worker.runs.train import own_trained_accuracy

    report = {"forget_source_acc_trained": {"3": [0.0, 12.5], "5": [0.4]}}
    sets = {"3": ["file:///a/3", "file:///b/3"], "5": ["file:///c/5"]}
    requests = {"r1": ("3", "file:///a/3", 0), "r2": ("3", "file:///b/3", 1), "r3": ("5", "file:///c/5", 0)}
    assert own_trained_accuracy(report, sets, requests) == {"r1": 0.0, "r2": 12.5, "r3": 0.4}
