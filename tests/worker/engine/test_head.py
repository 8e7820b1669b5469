"""The forgotten classes' head rows: reset to the mean of the kept rows, the class's template gone.

The run-level expectations (what relearning gives back, what Acc_r does) were written before the
first run: a reset model gives the class back less than the same run without the reset, and keeps
every kept-class prediction of the trained network.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import timm
import torch

from tests.digits import CARD, DigitsData
from worker.engine import ConfigError, ForgetSpec, UnlearnConfig, UnlearnInputs, UnlearnResult, unlearn
from worker.engine.errors import UnsupportedModelError
from worker.engine.evidence import relearn_accuracy
from worker.engine.head import classifier, reset_class_rows, row_prototypes
from worker.engine.images import normalise, read_images
from worker.engine.package import build_model, load_package, write_package
from worker.engine.unlearn import Training

FORGET = "3"
CLASS = 3
SERVICE = dict(method="lora-kl", adapter_blocks="later-half", seed=0)  # the service's many-image setting


def tiny_vit(seed: int = 0) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model(CARD["architecture"], pretrained=False, num_classes=10, **CARD["kwargs"]).eval()


# --- reset_class_rows ----------------------------------------------------------------------------

def test_a_forgotten_row_becomes_the_mean_of_the_kept_rows_and_the_kept_rows_stay():
    model = tiny_vit()
    with torch.no_grad():  # rows that differ in scale and bias, so a mean is not an accident
        model.head.weight.mul_(torch.arange(1, 11, dtype=torch.float32)[:, None])
        model.head.bias.copy_(torch.arange(10, dtype=torch.float32))
    before = model.head.weight.clone(), model.head.bias.clone()
    reset_class_rows(model, [3, 7])
    kept = [i for i in range(10) if i not in (3, 7)]
    for row in (3, 7):
        assert torch.allclose(model.head.weight[row], before[0][kept].mean(0))
        assert model.head.bias[row].item() == pytest.approx(before[1][kept].mean().item())
    assert torch.equal(model.head.weight[kept], before[0][kept])
    assert torch.equal(model.head.bias[kept], before[1][kept])


def test_a_reset_class_is_never_predicted_and_every_other_prediction_stays():
    model = tiny_vit()
    inputs = torch.randn(256, 1, 8, 8)
    logits_before = model(inputs)
    reset_class_rows(model, [CLASS])
    logits_after = model(inputs)
    # Its logit is the mean of the kept classes' on every input: below their best.
    kept = [i for i in range(10) if i != CLASS]
    assert torch.allclose(logits_after[:, CLASS], logits_after[:, kept].mean(1), atol=1e-5)
    assert (logits_after.argmax(1) != CLASS).all()
    was_kept = logits_before.argmax(1) != CLASS
    assert torch.equal(logits_after.argmax(1)[was_kept], logits_before.argmax(1)[was_kept])


@pytest.mark.parametrize("kept", [0, 1])
def test_fewer_than_two_kept_classes_leave_no_row_to_reset_to(kept):
    # One kept row: the reset rows would equal it, a tie on every input that argmax breaks by index.
    with pytest.raises(ConfigError, match="at least two classes kept"):
        reset_class_rows(tiny_vit(), range(10 - kept))


def test_a_model_without_a_linear_head_is_refused():
    with pytest.raises(UnsupportedModelError, match="no linear classifier head"):
        classifier(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)))


# --- in a run ------------------------------------------------------------------------------------

def run(model: Path, digits: DigitsData, forget: str = FORGET, **config) -> UnlearnResult:
    inputs = UnlearnInputs(model=str(model), forget=(ForgetSpec(forget, str(digits.train_class(forget))),))
    return unlearn(inputs, UnlearnConfig(**config))


@pytest.fixture(scope="module")
def runs(digits_model: Path, digits: DigitsData) -> dict[str, UnlearnResult]:
    """The service's setting on digit 3, the same seed, without and with the reset."""
    return {"kept": run(digits_model, digits, **SERVICE),
            "reset": run(digits_model, digits, **SERVICE, reset_head_rows=True)}


def test_the_published_row_is_the_mean_of_the_kept_rows_and_the_rest_is_the_trained_network(runs):
    kept, reset = runs["kept"].state_dict, runs["reset"].state_dict
    others = [i for i in range(10) if i != CLASS]
    assert torch.allclose(reset["head.weight"][CLASS], kept["head.weight"][others].mean(0))
    assert reset["head.bias"][CLASS].item() == pytest.approx(kept["head.bias"][others].mean().item())
    changed = {k for k in kept if not torch.equal(kept[k], reset[k])}
    assert changed == {"head.weight", "head.bias"}  # the same training, to the bit; only the row differs


def test_the_target_is_judged_on_the_trained_network_before_the_reset(runs, digits_model, digits):
    kept, reset = runs["kept"].report, runs["reset"].report
    assert reset.forget_acc_trained == kept.forget_acc_after == kept.forget_acc_trained
    assert reset.forget_acc_after == {FORGET: 0.0}
    # One step forgets nothing: the reset alone would put the forget set at 0 %, and the run still
    # says it missed the target.
    short = run(digits_model, digits, **SERVICE, max_steps=1, reset_head_rows=True).report
    assert short.forget_acc_after[FORGET] == 0.0
    assert short.forget_acc_trained[FORGET] > short.target_forget_acc
    assert not short.target_met


def test_the_held_out_figures_keep_the_trained_acc_f_and_the_kept_classes_lose_nothing(digits_model, digits):
    inputs = UnlearnInputs(model=str(digits_model), forget=(ForgetSpec(FORGET, str(digits.train_class(FORGET))),),
                           eval_source=str(digits.test))
    kept = unlearn(inputs, UnlearnConfig(**SERVICE, max_steps=3)).report.evaluation
    reset = unlearn(inputs, UnlearnConfig(**SERVICE, max_steps=3, reset_head_rows=True)).report.evaluation
    assert kept.acc_f_trained is None
    assert reset.acc_f_trained == kept.acc_f_after > 0  # three steps leave some of the class recognised
    assert reset.per_class_trained == kept.per_class_after and kept.per_class_trained is None
    assert reset.acc_f_after == 0.0
    assert reset.acc_r_after >= kept.acc_r_after


def test_ten_shot_fine_tuning_gives_a_reset_class_back_less(runs, digits, digits_model):
    card = load_package(digits_model).card
    audit = read_images(str(digits.test), card.input)
    audit_pixels, audit_labels = normalise(audit.pixels, card.input), audit.label_indices(card.classes)
    forget = normalise(read_images(str(digits.train_class(FORGET)), card.input).pixels, card.input)
    after = {name: relearn_accuracy(build_model(card, r.state_dict), forget, audit_pixels, audit_labels, CLASS,
                                    seed=0).accuracy_after for name, r in runs.items()}
    assert after["reset"] < after["kept"], after


def test_classes_forgotten_by_earlier_versions_are_reset_again(runs, digits, tmp_path):
    first = runs["reset"]
    parent = tmp_path / "v2"
    first.save(str(parent))
    second = run(parent, digits, forget="5", **SERVICE, reset_head_rows=True)
    weights = second.state_dict["head.weight"]
    kept = [i for i in range(10) if i not in (CLASS, 5)]
    assert torch.allclose(weights[CLASS], weights[kept].mean(0))  # no share of digit 5's template left in it
    assert torch.equal(weights[CLASS], weights[5])


def test_leaving_one_kept_class_with_the_reset_is_refused_before_training(digits_model, digits, tmp_path, monkeypatch):
    loaded = load_package(digits_model)
    card = {**loaded.card.raw, "lineage": [{"classes_forgotten": [str(d) for d in range(10) if d not in (3, 7)]}]}
    parent = tmp_path / "eight-forgotten"
    write_package(str(parent), card, loaded.state_dict)
    monkeypatch.setattr(Training, "run", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(ConfigError, match="at least two classes kept; 1 would be left"):
        run(parent, digits, **SERVICE, reset_head_rows=True)


def test_a_model_whose_head_cannot_be_reset_is_refused_before_training(digits_model, digits, monkeypatch):
    def refuse(model):
        raise UnsupportedModelError("no linear classifier head")

    monkeypatch.setattr(importlib.import_module("worker.engine.unlearn"), "classifier", refuse)
    monkeypatch.setattr(Training, "run", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(UnsupportedModelError):
        run(digits_model, digits, **SERVICE, reset_head_rows=True)


def test_each_source_of_a_class_gets_its_own_trained_figure(digits_model, digits, tmp_path):
    """Two requests for one class: the trained network's figure per set, the class's the worst of them."""
    images = sorted(digits.train_class(FORGET).iterdir())
    halves = [tmp_path / "a" / FORGET, tmp_path / "b" / FORGET]
    for folder, part in zip(halves, (images[:20], images[20:])):
        folder.mkdir(parents=True)
        for image in part:
            (folder / image.name).write_bytes(image.read_bytes())
    inputs = UnlearnInputs(model=str(digits_model), forget=(ForgetSpec(FORGET, str(halves[0]), (str(halves[1]),)),))
    report = unlearn(inputs, UnlearnConfig(**SERVICE, max_steps=2, reset_head_rows=True)).report
    first, second = report.forget_source_acc_trained[FORGET]
    assert report.forget_acc_trained[FORGET] == max(first, second) > 0
    assert report.forget_acc_after[FORGET] == 0.0


def test_row_prototypes_point_along_each_class_s_row_at_the_norm_asked_for():
    rows = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, -2.0], [1.0, 1.0, 1.0]])
    found = row_prototypes(rows, torch.tensor([1, 0, 0]), torch.tensor([5.0, 10.0, 1.0]))
    assert torch.allclose(found, torch.tensor([[0.0, 0.0, -5.0], [6.0, 8.0, 0.0], [0.6, 0.8, 0.0]]))
