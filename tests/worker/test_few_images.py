"""The service's setting for few images, and the generalisation check, on the case that CIFAR-10
hid: forgetting a class from the 8 images a request carries (the tests' digits model; each digit's
first 8 training images by name, seed 0 — the benchmark's cases, benchmarks/README.md).

Fixed before the first run: the cases above, 50 % held-out Acc_f as the line of a silent failure
(the issue's "no person above 50 %"), and the gate's own default threshold.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from statistics import mean

import pytest

from service.config import Settings, UnlearnSettings
from tests.digits import CLASSES, DigitsData
from tests.worker.engine.test_unlearn import held_out_accuracy
from worker.engine import ForgetSpec, UnlearnConfig, UnlearnInputs, unlearn
from worker.runs.gate import holdout_errors

FEW = 8
OLD_DEFAULT = {"method": "lora-kl", "adapter_blocks": "later-half"}  # the service's setting before few images had one
SILENT_FAILURE = 50.0

pytestmark = pytest.mark.slow


def first_images(digits: DigitsData, digit: str, root: Path) -> Path:
    folder = root / f"few-{digit}" / digit
    folder.mkdir(parents=True, exist_ok=True)
    for image in sorted(digits.train_class(digit).iterdir())[:FEW]:
        shutil.copy(image, folder / image.name)
    return folder


@pytest.fixture(scope="module")
def few_image_sets(digits: DigitsData, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("few-images")
    return {digit: first_images(digits, digit, root) for digit in CLASSES}


def run(model: Path, digit: str, forget_set: Path, **config):
    inputs = UnlearnInputs(model=str(model), forget=(ForgetSpec(digit, str(forget_set)),))
    return unlearn(inputs, UnlearnConfig(seed=0, **config))


@pytest.fixture(scope="module")
def old_default_runs(digits_model, few_image_sets):
    folds = Settings().gate_holdout_folds
    return {d: run(digits_model, d, s, holdout_folds=folds, **OLD_DEFAULT) for d, s in few_image_sets.items()}


@pytest.fixture(scope="module")
def new_default_runs(digits_model, few_image_sets):
    knobs = UnlearnSettings().engine_settings(FEW)
    return {d: run(digits_model, d, s, **knobs) for d, s in few_image_sets.items()}


def held_out(results, digits) -> dict[str, float]:
    return {d: held_out_accuracy(r.card, r.state_dict, digits, forget=d)[0] for d, r in results.items()}


def test_forgetting_eight_images_leaves_some_digit_recognised_with_the_old_setting(old_default_runs, digits):
    assert all(r.target_met for r in old_default_runs.values())  # the 8 images themselves are forgotten
    assert max(held_out(old_default_runs, digits).values()) > SILENT_FAILURE


def test_the_check_fails_every_run_whose_held_back_images_are_still_recognised(old_default_runs):
    """The gate acts on the check's figure: each run above the threshold fails, with the reason.

    Whether that figure finds a silent failure depends on the CPU's arithmetic: on one 2-core machine
    it caught one of the two digits the old setting left above 50 %; on the AVX-512 machine of
    2026-12-07 (this commit's previous one too) it caught neither (digits 1 and 3: 70 and 65 % of
    unseen images recognised, 25 and 12.5 % of held-back ones) and flagged digits that generalised.
    Eight images in three folds score each image once, and the held-back images are ones the
    original trained on: the figure is a noisy, low estimate at this size (the closing note says so).
    """
    settings = Settings()
    figures = {d: r.report.holdout.forget_acc[d] for d, r in old_default_runs.items()}
    failed = {d for d, r in old_default_runs.items() if holdout_errors(settings, dataclasses.asdict(r.report.holdout))}
    assert failed == {d for d, acc in figures.items() if acc > settings.gate_max_holdout_forget_acc}, figures
    assert failed, f"no run above the gate's {settings.gate_max_holdout_forget_acc} %: {figures}"
    error = holdout_errors(settings, dataclasses.asdict(old_default_runs[min(failed)].report.holdout))[0]
    assert error.startswith("forgetting did not generalise")


def test_the_few_image_setting_leaves_no_digit_recognised_and_generalises_better(
        new_default_runs, old_default_runs, digits):
    new, old = held_out(new_default_runs, digits), held_out(old_default_runs, digits)
    assert all(r.target_met for r in new_default_runs.values())
    assert max(new.values()) <= SILENT_FAILURE
    assert mean(new.values()) < mean(old.values())
