"""unlearn(): forgetting digit 3 of the tiny digits ViT with only its training images.

Seeds and thresholds come from the issue and were fixed before the first run: seeds 0, 1, 2;
held-out Acc_f <= 5 % and an Acc_r drop <= 12 points.
"""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.digits import CLASSES, DigitsData
from worker.engine import (
    METHODS,
    ConfigError,
    ForgetSpec,
    ImageSourceError,
    UnlearnConfig,
    UnlearningCancelled,
    UnlearnInputs,
    UnlearnResult,
    unlearn,
)
from worker.engine.evidence import features
from worker.engine.images import normalise, read_images
from worker.engine.loop import MAX_SCORED_FALLBACKS, SYNTHESISED_PER_CLASS, worst_source
from worker.engine.metrics import accuracy, forget_retain_accuracy, predict
from worker.engine.package import InputSpec, ModelCard, build_model, load_package
from worker.engine.halves import split_halves
from worker.engine.unlearn import forget_set_facts, read_forget_set
from worker.engine.runtime import pick_runtime

SEEDS = (0, 1, 2)
FORGET = "3"


def forget_three(digits: DigitsData) -> tuple[ForgetSpec, ...]:
    return (ForgetSpec(FORGET, str(digits.train_class(FORGET))),)


def run(model: Path, digits: DigitsData, eval_source: Path | None = None, retain: str | None = None,
        forget: tuple[ForgetSpec, ...] | None = None, **config) -> UnlearnResult:
    inputs = UnlearnInputs(model=str(model), forget=forget or forget_three(digits),
                           eval_source=str(eval_source) if eval_source else None, retain_source=retain)
    return unlearn(inputs, UnlearnConfig(**config))


def held_out_accuracy(card: dict, state_dict: dict, digits: DigitsData, forget: str = FORGET) -> tuple[float, float]:
    """(Acc_f, Acc_r) of a model on the test split, which no run sees."""
    parsed = ModelCard.from_dict(card)
    test = read_images(str(digits.test), parsed.input)
    predictions = predict(build_model(parsed, state_dict), test.pixels, pick_runtime("cpu"), 512, parsed.input)
    return forget_retain_accuracy(predictions, test.label_indices(parsed.classes), [parsed.class_index(forget)])


@pytest.fixture(scope="module")
def base_accuracy(digits_model: Path, digits: DigitsData) -> tuple[float, float]:
    package = load_package(digits_model)
    return held_out_accuracy(package.card.raw, package.state_dict, digits)


@pytest.fixture(scope="module")
def default_runs(digits_model: Path, digits: DigitsData) -> list[UnlearnResult]:
    return [run(digits_model, digits, seed=seed) for seed in SEEDS]


@pytest.fixture(scope="module")
def selected_runs(digits_model: Path, digits: DigitsData) -> list[UnlearnResult]:
    return [run(digits_model, digits, eval_source=digits.val, seed=seed, select_on_eval=True) for seed in SEEDS]


# --- quality ---------------------------------------------------------------------------------

def test_the_digits_model_is_accurate_before_unlearning(base_accuracy):
    acc_f, acc_r = base_accuracy
    assert acc_f >= 90 and acc_r >= 90


def test_defaults_forget_the_class_and_keep_the_other_classes(default_runs, base_accuracy, digits):
    held_out = [held_out_accuracy(r.card, r.state_dict, digits) for r in default_runs]
    assert all(r.target_met and r.report.forget_acc_after[FORGET] <= 1.0 for r in default_runs)
    assert mean(acc_f for acc_f, _ in held_out) <= 5.0
    assert base_accuracy[1] - mean(acc_r for _, acc_r in held_out) <= 12.0


def test_select_on_eval_keeps_the_best_scoring_checkpoint_that_meets_the_target(selected_runs):
    for result in selected_runs:
        selection = result.report.selection
        qualifying = [e for e in selection["evaluations"] if e["meets_target"]]
        assert qualifying and selection["best"] == max(qualifying, key=lambda e: e["score"])
        assert result.report.steps == selection["best"]["step"] and selection["selected_by"] == "stop rule"
        assert all(acc <= 1.0 for acc in selection["best"]["forget_acc"].values())


def test_selection_skips_only_what_it_could_not_select(digits_model, digits, monkeypatch):
    # A checkpoint whose first forget images already miss the target records that lower bound and is
    # not evaluated further; measuring every checkpoint whole (a bound over every image) selects the
    # same step and writes the same weights.
    from worker.engine import loop

    quick = run(digits_model, digits, eval_source=digits.val, seed=0, select_on_eval=True)
    monkeypatch.setattr(loop, "EARLY_CHECK_IMAGES", 10**9)
    whole = run(digits_model, digits, eval_source=digits.val, seed=0, select_on_eval=True)
    skipped = [e for e in quick.report.selection["evaluations"] if "forget_acc_at_least" in e]
    assert skipped and all(e["acc_r"] is None and not e["meets_target"] for e in skipped)
    assert all(b > 1.0 for e in skipped for b in e["forget_acc_at_least"].values())
    assert quick.report.selection["best"] == whole.report.selection["best"]
    assert all(torch.equal(quick.state_dict[k], v) for k, v in whole.state_dict.items())


def test_selection_without_a_checkpoint_at_the_margin_keeps_the_best_that_forgot_its_images(digits_model, digits):
    # A probability bound no run reaches in 15 steps: the stop rule's measure is met by no checkpoint,
    # yet several forget their images (the report's target). The weights written are the best-scoring
    # of those, not the last step's, and the report says what they met.
    result = run(digits_model, digits, eval_source=digits.val, seed=0, select_on_eval=True,
                 max_forget_prob=1e-9, max_steps=15)  # the images flip at step 5 or 6 (measured)
    selection, report = result.report.selection, result.report
    assert not any(e["meets_target"] for e in selection["evaluations"])
    forgot = [e for e in selection["evaluations"] if e.get("forgets")]
    assert forgot and selection["selected_by"] == "target"
    scored = [e for e in forgot if e["score"] is not None]  # at most MAX_SCORED_FALLBACKS, the last included
    assert scored[-1] == forgot[-1] and len(scored) <= MAX_SCORED_FALLBACKS
    assert selection["best"] == max(scored, key=lambda e: e["score"]) and report.steps == selection["best"]["step"]
    assert report.target_met and not report.stop_rule_met
    assert report.forget_acc_trained == selection["best"]["forget_acc_argmax"]


def scripted_selection(monkeypatch, at_margin: set[int], forgot: set[int]) -> tuple[dict, list]:
    """Which checkpoints reach the margin depends on a run's arithmetic, so a test scripts them over
    a real run: the steps in ``at_margin`` meet the stop rule's measure, those in ``forgot`` only
    the target, and a checkpoint's score falls with its step (the first scores best). Returns what
    each evaluation was asked to judge and the steps scored, in order."""
    from worker.engine.loop import UnlearningLoop

    judged, scored = {}, []

    def evaluation(self, step, judge_target):
        judged[step] = judge_target
        return {"step": step, "forget_acc": {FORGET: 0.0}, "acc_f": None, "acc_r": None, "score": None,
                "meets_target": step in at_margin, **({"forgets": True} if step in forgot else {})}

    def score(self, evaluation):
        scored.append(evaluation["step"])
        evaluation.update(acc_f=0.0, acc_r=99.0 - evaluation["step"], score=99.0 - evaluation["step"])

    monkeypatch.setattr(UnlearningLoop, "_checkpoint_evaluation", evaluation)
    monkeypatch.setattr(UnlearningLoop, "_score", score)
    return judged, scored


def test_selection_prefers_a_checkpoint_at_the_margin_to_any_that_only_forgot(digits_model, digits, monkeypatch):
    # Step 1 only forgot and would score best; step 2 reached the margin. Step 2 is kept, step 1 is
    # never scored, and once step 2 exists no checkpoint is judged on the target alone.
    judged, scored = scripted_selection(monkeypatch, at_margin={2}, forgot={1, 3})
    result = run(digits_model, digits, eval_source=digits.val, seed=0, select_on_eval=True, max_steps=4)
    selection = result.report.selection
    assert selection["selected_by"] == "stop rule" and selection["best"]["step"] == 2 == result.report.steps
    assert judged == {1: True, 2: True, 3: False, 4: False} and scored == [2]


def test_the_fallback_writes_its_checkpoints_weights_not_the_last_steps(digits_model, digits, monkeypatch):
    # No step reaches the margin; every one forgot. They are scored once the run ends, and the best
    # (step 1) is written, the same weights as a run that stopped there.
    _, scored = scripted_selection(monkeypatch, at_margin=set(), forgot={1, 2, 3, 4})
    kept = run(digits_model, digits, eval_source=digits.val, seed=0, select_on_eval=True, max_steps=4)
    assert scored == [1, 2, 3, 4]
    first = run(digits_model, digits, eval_source=digits.val, seed=0, select_on_eval=True, max_steps=1)
    assert kept.report.selection["selected_by"] == "target" and kept.report.steps == 1 < kept.report.steps_run
    assert kept.report.selection["best"]["score"] == 98.0
    assert all(torch.equal(first.state_dict[k], v) for k, v in kept.state_dict.items())


def test_fallback_checkpoints_past_the_memory_bound_are_scored_in_groups(digits_model, digits, monkeypatch):
    # A bound smaller than one checkpoint scores each as it comes, keeping only the best: the same
    # choice and weights as scoring them at the end.
    from worker.engine import loop

    _, scored = scripted_selection(monkeypatch, at_margin=set(), forgot={1, 2, 3, 4})
    at_end = run(digits_model, digits, eval_source=digits.val, seed=0, select_on_eval=True, max_steps=4)
    monkeypatch.setattr(loop, "MAX_UNSCORED_CHECKPOINT_BYTES", 0)
    scored.clear()
    grouped = run(digits_model, digits, eval_source=digits.val, seed=0, select_on_eval=True, max_steps=4)
    assert scored == [1, 2, 3, 4] and grouped.report.steps == at_end.report.steps == 1
    assert all(torch.equal(at_end.state_dict[k], v) for k, v in grouped.state_dict.items())


def test_the_fallback_scores_a_bounded_number_of_its_checkpoints_evenly_spaced(digits_model, digits, monkeypatch):
    # Fifteen checkpoints forgot, none reached the margin: three are scored (the last, and every
    # fifth before it); the others keep no score, and the best of the three is written.
    from worker.engine import loop

    monkeypatch.setattr(loop, "MAX_SCORED_FALLBACKS", 3)
    _, scored = scripted_selection(monkeypatch, at_margin=set(), forgot=set(range(1, 16)))
    result = run(digits_model, digits, eval_source=digits.val, seed=0, select_on_eval=True, max_steps=15)
    assert scored == [5, 10, 15] and result.report.steps == 5
    assert [e["step"] for e in result.report.selection["evaluations"] if e["score"] is not None] == [5, 10, 15]


def test_a_run_that_reaches_the_margin_selects_as_it_did_before_the_fallback(digits_model, digits, monkeypatch):
    # The fallback's extra judgement changes nothing for a run that reaches the stop rule's margin:
    # the same checkpoint, the same evaluations at the margin, the same weights as with no margin
    # judged at all (what selection was before it). With the few-image margin the forget images
    # flip some steps before they reach it (1 to 12 of them, measured), so there is something to judge.
    from worker.engine.loop import UnlearningLoop

    setting = dict(eval_source=digits.val, seed=0, select_on_eval=True, max_forget_prob=0.05, patience=2)
    with_fallback = run(digits_model, digits, **setting)
    monkeypatch.setattr(UnlearningLoop, "has_margin", property(lambda self: False))
    without = run(digits_model, digits, **setting)
    assert with_fallback.report.selection["selected_by"] == "stop rule"
    assert any(e.get("forgets") for e in with_fallback.report.selection["evaluations"])
    assert with_fallback.report.selection["best"] == without.report.selection["best"]
    assert with_fallback.report.steps_run == without.report.steps_run
    assert all(torch.equal(without.state_dict[k], v) for k, v in with_fallback.state_dict.items())


def test_select_on_eval_forgets_and_keeps_the_others_on_the_test_split(selected_runs, base_accuracy, digits):
    held_out = [held_out_accuracy(r.card, r.state_dict, digits) for r in selected_runs]
    assert mean(acc_f for acc_f, _ in held_out) <= 5.0
    assert base_accuracy[1] - mean(acc_r for _, acc_r in held_out) <= 12.0


def test_lora_kl_forgets_on_every_seed_and_keeps_the_other_classes(digits_model, digits, base_accuracy):
    # Whether it keeps *more* than the bounded loss is the benchmarks' to say (the paper table,
    # benchmarks/README.md): on the digits model the two differ by less than their seed noise, and
    # which is ahead depends on the CPU's arithmetic. Mean Acc_r drops, seeds 0/1/2: on an AVX2
    # machine when the method was added, lora-bounded 7.6, lora-kl 3.8 points; on an AVX-512 one
    # (one torch thread, as the suite runs), lora-bounded 1.2, lora-kl 1.4.
    kl_runs = [run(digits_model, digits, method="lora-kl", seed=seed) for seed in SEEDS]
    kl = [held_out_accuracy(r.card, r.state_dict, digits) for r in kl_runs]
    assert all(r.target_met for r in kl_runs) and all(acc_f <= 5.0 for acc_f, _ in kl)
    assert base_accuracy[1] - mean(acc_r for _, acc_r in kl) <= 12.0


def test_lora_adv_forgets_with_neighbours_that_add_images_to_every_step(digits_model, digits, base_accuracy):
    # A candidate of the benchmarks: the test holds it to forgetting its set and generalising far
    # below the original's ~95 % on unseen images of the class, not to the product's 5 % gate,
    # which is the benchmarks' to compare. Measured: 1 of the 37 unseen 3s still recognised on an
    # AVX-512 machine; 2 of 37 (5.4 %) on an AMX one, on seeds 0, 1 and 2 alike (lora-kl: 0-1).
    result = run(digits_model, digits, method="lora-adv", seed=0)
    acc_f, acc_r = held_out_accuracy(result.card, result.state_dict, digits)
    assert result.target_met and acc_f <= 10.0
    assert base_accuracy[1] - acc_r <= 12.0
    assert result.report.trainable_parameters == run_trainable(digits_model, digits)  # same adapters as lora-kl


def run_trainable(model: Path, digits: DigitsData) -> int:
    return run(model, digits, method="lora-kl", seed=0, max_steps=1).report.trainable_parameters


def test_the_stop_rule_keeps_the_weights_that_reached_the_target(default_runs):
    for result in default_runs:
        last = result.report.history[-1]
        assert last["confirmed"] and not last["updated"]
        assert result.report.steps == last["step"] - 1 == result.report.steps_run


@pytest.mark.parametrize("method", ["lora-bounded", "lora-kl"])
def test_two_classes_are_forgotten_in_one_run(digits_model, digits, method):
    forget = forget_three(digits) + (ForgetSpec("8", str(digits.train_class("8"))),)
    result = run(digits_model, digits, eval_source=digits.test, forget=forget, method=method)
    assert result.target_met
    assert set(result.report.forget_acc_after) == {"3", "8"}
    assert all(acc <= 1.0 for acc in result.report.forget_acc_after.values())
    assert result.report.evaluation.acc_f_after <= 5.0
    assert result.card["lineage"][-1]["classes_forgotten"] == ["3", "8"]


def test_a_run_that_cannot_reach_the_target_says_so(digits_model, digits):
    result = run(digits_model, digits, max_steps=1)
    assert not result.target_met
    assert result.report.steps == 1 and result.report.forget_acc_after[FORGET] > 1.0


def test_a_class_the_model_already_misses_needs_no_steps(digits_model, digits):
    result = run(digits_model, digits, target_forget_acc=100.0)
    assert result.target_met and result.report.steps == 0
    original = load_package(digits_model).state_dict
    assert all(torch.equal(result.state_dict[k], original[k]) for k in original)


# --- the merged package ------------------------------------------------------------------------

def test_the_merged_package_loads_with_plain_timm_and_safetensors(default_runs, digits_model, digits, tmp_path):
    result = default_runs[0]
    result.save(str(tmp_path / "out"))
    card = json.loads((tmp_path / "out" / "model.json").read_text())
    weights = load_file(str(tmp_path / "out" / "model.safetensors"))
    model = timm.create_model(card["architecture"], pretrained=False, num_classes=len(card["classes"]), **card["kwargs"])
    model.load_state_dict(weights, strict=True)
    original = load_file(str(digits_model / "model.safetensors"))
    assert weights.keys() == original.keys()
    assert all(weights[k].shape == original[k].shape and weights[k].dtype == original[k].dtype for k in original)
    assert not any("lora" in k for k in weights)
    # The file holds the weights the run measured: same forget-set accuracy.
    x = torch.stack([torch.from_numpy(__import__("numpy").asarray(Image.open(p), dtype="float32")) / 255.0
                     for p in sorted(digits.train_class(FORGET).iterdir())])[:, None]
    x = (x - card["input"]["mean"][0]) / card["input"]["std"][0]
    with torch.no_grad():
        predicted = model.eval()(x).argmax(1)
    assert accuracy(predicted, torch.full_like(predicted, CLASSES.index(FORGET))) == pytest.approx(
        result.report.forget_acc_after[FORGET])


def test_only_the_qkv_weights_change(default_runs, digits_model):
    original = load_package(digits_model).state_dict
    changed = {k for k in original if not torch.equal(default_runs[0].state_dict[k], original[k])}
    assert changed == {f"blocks.{b}.attn.qkv.weight" for b in range(4)}


def test_the_same_seed_gives_the_same_weights_and_another_seed_does_not(default_runs, digits_model, digits):
    again = run(digits_model, digits, seed=SEEDS[0])
    assert all(torch.equal(again.state_dict[k], v) for k, v in default_runs[0].state_dict.items())
    assert any(not torch.equal(default_runs[1].state_dict[k], v) for k, v in default_runs[0].state_dict.items())


def test_the_card_gains_a_lineage_entry(default_runs, digits_model):
    package = load_package(digits_model)
    result = default_runs[0]
    assert {k: v for k, v in result.card.items() if k != "lineage"} == package.card.raw
    entry = result.card["lineage"][-1]
    assert entry["parent_sha256"] == package.weights_sha256
    assert entry["method"] == "lora-bounded" and entry["classes_forgotten"] == [FORGET]
    assert entry["config"]["lr"] == 1e-2 and entry["config"]["rank"] == 8 and entry["config"]["l1_weight"] == 1e-3
    assert entry["steps"] == result.report.steps and entry["seconds"] == result.report.seconds


def test_the_report_holds_the_run_figures(default_runs, digits):
    report = default_runs[0].report
    lora_params = 4 * (8 * 64 + 3 * 64 * 8)  # per block: A (r x 64) and B (192 x r)
    assert report.trainable_parameters == lora_params
    assert report.optimizer_state_bytes >= 2 * lora_params * 4  # Adam: two fp32 moments
    assert report.forget_set_size == {FORGET: len(list(digits.train_class(FORGET).iterdir()))}
    assert report.forget_acc_before[FORGET] > 90
    assert report.peak_memory_bytes is not None and report.peak_memory_bytes >= 0
    assert report.device == "cpu" and report.precision in ("fp32", "bf16")
    assert report.seconds > 0 and report.total_seconds >= report.seconds
    json.dumps(report.to_dict())  # the report is plain JSON


def test_the_evaluation_block_has_per_class_accuracy_before_and_after(digits_model, digits):
    evaluation = run(digits_model, digits, eval_source=digits.test).report.evaluation
    assert set(evaluation.per_class_before) == set(CLASSES)
    assert evaluation.acc_f_before == pytest.approx(evaluation.per_class_before[FORGET])
    assert evaluation.acc_f_after == pytest.approx(evaluation.per_class_after[FORGET])
    assert evaluation.per_class_images[FORGET] > 0 and sum(evaluation.per_class_images.values()) == evaluation.images
    assert evaluation.acc_f_after < evaluation.acc_f_before


# --- baselines -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def retain_manifest(digits: DigitsData) -> str:
    """A labelled retain source: a manifest of the other digits' training images (paths relative to it)."""
    path = digits.root / "retain.csv"
    rows = [f"{p.relative_to(digits.root)},{p.parent.name}" for p in sorted(digits.train.rglob("*.png"))
            if p.parent.name != FORGET]
    path.write_text("path,label\n" + "\n".join(rows) + "\n")
    return str(path)


@pytest.mark.parametrize("method", sorted(set(METHODS) - {"lora-bounded"}))
def test_every_baseline_runs_behind_the_same_interface(method, digits_model, digits, retain_manifest):
    retain = retain_manifest if METHODS[method].uses_retain else None
    result = run(digits_model, digits, retain=retain, method=method, max_steps=3, batch_size=64)
    original = load_package(digits_model).state_dict
    assert result.state_dict.keys() == original.keys()
    assert 1 <= result.report.steps_run <= 3 and result.report.method == method
    assert any(not torch.equal(result.state_dict[k], original[k]) for k in original)
    all_weights = sum(v.numel() for v in original.values())
    if METHODS[method].adapters:
        assert result.report.trainable_parameters < all_weights
    else:
        assert result.report.trainable_parameters == all_weights


# --- progress, cancellation and bad input -----------------------------------------------------------

def test_progress_is_reported_every_step_and_a_cancel_stops_the_run(digits_model, digits):
    seen = []
    with pytest.raises(UnlearningCancelled):
        run_inputs = UnlearnInputs(model=str(digits_model), forget=forget_three(digits))
        unlearn(run_inputs, UnlearnConfig(), on_progress=seen.append, should_cancel=lambda: len(seen) >= 2)
    assert [p.step for p in seen] == [1, 2]
    assert all(FORGET in p.forget_acc and p.max_steps == 100 for p in seen)


def test_bad_configurations_are_refused_before_loading(digits_model, digits):
    with pytest.raises(ConfigError, match="unknown method"):
        UnlearnConfig(method="magic")
    with pytest.raises(ConfigError, match="needs a retain source"):
        run(digits_model, digits, method="finetune")
    with pytest.raises(ConfigError, match="select_on_eval needs"):
        run(digits_model, digits, select_on_eval=True)
    with pytest.raises(ConfigError, match="more than once"):
        UnlearnInputs(model=str(digits_model), forget=forget_three(digits) * 2)
    with pytest.raises(ConfigError, match="'cat' is not one of the model's classes"):
        run(digits_model, digits, forget=(ForgetSpec("cat", str(digits.train_class(FORGET))),))


def test_bad_image_sources_are_refused_before_training(digits_model, digits, tmp_path, retain_manifest):
    with pytest.raises(ImageSourceError, match="no such file or directory"):
        run(digits_model, digits, forget=(ForgetSpec(FORGET, str(tmp_path / "missing")),))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageSourceError, match="no images found"):
        run(digits_model, digits, forget=(ForgetSpec(FORGET, str(tmp_path / "empty")),))
    unknown = tmp_path / "eval" / "eleven"
    unknown.mkdir(parents=True)
    Image.new("L", (8, 8)).save(unknown / "0.png")
    with pytest.raises(ImageSourceError, match="not among the model's classes: eleven"):
        run(digits_model, digits, eval_source=tmp_path / "eval")
    with pytest.raises(ImageSourceError, match="holds images of a class being forgotten"):
        run(digits_model, digits, retain=str(digits.train), method="finetune")


# --- GPU -----------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_the_run_uses_cuda_with_bf16_autocast_and_still_forgets(digits_model, digits, base_accuracy):
    result = run(digits_model, digits, device="cuda")
    assert result.report.device.startswith("cuda") and result.report.precision == "bf16"
    assert result.target_met
    assert all(v.device.type == "cpu" for v in result.state_dict.values())
    acc_f, acc_r = held_out_accuracy(result.card, result.state_dict, digits)
    assert acc_f <= 5.0 and base_accuracy[1] - acc_r <= 20.0


# --- review regressions ----------------------------------------------------------------------------

def test_an_overconfident_model_never_gets_non_finite_weights(digits_model, digits, tmp_path):
    from safetensors.torch import save_file

    weights = load_file(str(digits_model / "model.safetensors"))
    weights["head.bias"] = weights["head.bias"].clone()
    weights["head.bias"][CLASSES.index(FORGET)] = 60.0  # CE on its images is exactly 0 in fp32
    package = tmp_path / "confident"
    package.mkdir()
    save_file(weights, str(package / "model.safetensors"))
    (package / "model.json").write_text((digits_model / "model.json").read_text())
    result = run(package, digits, max_steps=3)
    assert all(torch.isfinite(v).all() for v in result.state_dict.values())
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.report.history)


def test_reaching_the_target_on_the_last_allowed_step_counts_as_met(default_runs, digits_model, digits):
    steps = default_runs[0].report.steps
    result = run(digits_model, digits, seed=SEEDS[0], max_steps=steps)
    assert result.report.steps_run == steps and result.target_met


def test_an_evaluation_source_without_the_forgotten_class_is_refused(digits_model, digits, tmp_path):
    import shutil

    shutil.copytree(digits.test / "5", tmp_path / "eval" / "5")
    with pytest.raises(ImageSourceError, match="has no images of 3"):
        run(digits_model, digits, eval_source=tmp_path / "eval")


def test_a_half_precision_package_stays_half_precision(digits_model, digits, tmp_path):
    from safetensors.torch import save_file

    package = tmp_path / "fp16"
    package.mkdir()
    save_file({k: v.half() for k, v in load_file(str(digits_model / "model.safetensors")).items()},
              str(package / "model.safetensors"))
    (package / "model.json").write_text((digits_model / "model.json").read_text())
    result = run(package, digits)
    assert {v.dtype for v in result.state_dict.values()} == {torch.float16}
    assert result.target_met  # measured on the fp16 weights that are written


def test_seeds_outside_64_bits_are_refused():
    with pytest.raises(ConfigError, match="seed"):
        UnlearnConfig(seed=2**70)


def package_with(model: Path, folder: Path, *, kwargs: dict | None = None, scale_head: float = 1.0,
                 shift_rows: float = 0.0) -> Path:
    """A copy of the package with card kwargs added and the head's weights scaled; with ``shift_rows``,
    one random vector of that norm added to every head row, which adds one number to every logit of
    an image: the same outputs, from rows that no longer point at their classes' features."""
    from safetensors.torch import save_file

    folder.mkdir()
    card = json.loads((model / "model.json").read_text())
    card["kwargs"] = {**card["kwargs"], **(kwargs or {})}
    (folder / "model.json").write_text(json.dumps(card))
    weights = {k: v * scale_head if k.startswith("head.") else v for k, v in load_file(model / "model.safetensors").items()}
    shift = torch.randn(weights["head.weight"].shape[1], generator=torch.Generator().manual_seed(0))
    weights["head.weight"] = weights["head.weight"] + shift_rows * shift / shift.norm()
    save_file(weights, folder / "model.safetensors")
    return folder


def test_unlearning_runs_in_eval_mode_even_when_the_card_sets_dropout_and_drop_path(digits, digits_model, tmp_path):
    package = package_with(digits_model, tmp_path / "dropout", kwargs={"drop_rate": 0.5, "drop_path_rate": 0.5})
    from timm.layers import DropPath

    training_forwards = []

    def record(module, _inputs):
        if isinstance(module, (torch.nn.Dropout, DropPath)) and module.training:
            training_forwards.append(type(module).__name__)

    hook = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        result = run(package, digits, method="lora-kl", max_steps=5)
    finally:
        hook.remove()
    assert result.report.steps >= 1
    assert training_forwards == []


def test_the_paper_method_moves_a_model_certain_of_its_forget_images(digits, digits_model, tmp_path):
    package = package_with(digits_model, tmp_path / "certain", scale_head=200.0)  # CE underflows to ~0 in fp32
    result = run(package, digits, method="lora-bounded", max_steps=10)
    assert result.report.forget_acc_before[FORGET] == 100.0
    assert result.report.forget_acc_after[FORGET] < 100.0


def test_a_class_read_from_several_sources_knows_which_images_each_holds(tmp_path):
    shared = Image.fromarray(torch.full((8, 8), 200, dtype=torch.uint8).numpy())
    for name, shades in (("a", (10, 20)), ("b", (30,))):
        folder = tmp_path / name
        folder.mkdir()
        for shade in shades:
            Image.fromarray(torch.full((8, 8), shade, dtype=torch.uint8).numpy()).save(folder / f"{shade}.png")
        shared.save(folder / "shared.png")  # one photo in both requests' sets
    spec = InputSpec(size=(8, 8), mean=(0.5,), std=(0.5,), channels="L")
    forget = ForgetSpec("3", str(tmp_path / "a"), more_sources=(str(tmp_path / "b"),))
    images = read_forget_set(forget, spec)
    assert len(images) == 4 and images.duplicates == 1  # the shared photo once
    assert images.members.sum(1).tolist() == [3, 2]  # a: 10, 20, shared; b: 30, shared
    assert images.members.all(0).sum() == 1


def test_a_class_from_several_sources_is_as_recognised_as_its_worst_source():
    still = torch.tensor([True, False, False, False, False, False])
    members = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    assert worst_source(still, None) == pytest.approx(100 / 6)
    assert worst_source(still, members) == pytest.approx(100 / 3)  # the first request's set: 1 of 3
    two_views = torch.cat([still, torch.zeros(6, dtype=torch.bool)])  # view after view
    assert worst_source(two_views, members) == pytest.approx(100 / 6)


def test_the_feature_term_moves_the_forget_features_toward_the_next_class_s_prototype(digits_model, digits):
    # The same 40 steps (the feature stop rule is never met), with the term and with it all but off:
    # the term, not the training budget, is what brings the forget features toward their targets
    # (the original's own distance to them is 1).
    spec = (ForgetSpec(FORGET, str(digits.train_class(FORGET))),)
    common = dict(method="lora-kl", targets=("qkv", "proj", "fc1", "fc2"), adapter_blocks="later-half", lr=1e-2,
                  feature_tol=1e-6, max_steps=40, seed=0)
    on, off = (unlearn(UnlearnInputs(model=str(digits_model), forget=spec), UnlearnConfig(feature_weight=w, **common))
               for w in (10.0, 1e-9))
    final = [r.report.history[-1]["feature_loss"] for r in (on, off)]
    assert on.report.steps == off.report.steps == 40
    assert final[0] < final[1] and final[1] > 0.5, final
    assert on.report.forget_acc_after[FORGET] <= 1.0


def test_head_prototypes_move_the_forget_features_without_synthesising_an_input(digits_model, digits, monkeypatch):
    # The head rows stand in for the synthesised prototypes: model inversion must not run, and the
    # term still brings the forget features toward their targets within the same 40 steps.
    import worker.engine.loop as loop

    monkeypatch.setattr(loop, "invert_classes", lambda *a, **k: pytest.fail("synthesised an input"))
    spec = (ForgetSpec(FORGET, str(digits.train_class(FORGET))),)
    common = dict(method="lora-kl", targets=("qkv", "proj", "fc1", "fc2"), adapter_blocks="later-half", lr=1e-2,
                  feature_tol=1e-6, max_steps=40, seed=0, feature_prototypes="head")
    on, off = (unlearn(UnlearnInputs(model=str(digits_model), forget=spec), UnlearnConfig(feature_weight=w, **common))
               for w in (10.0, 1e-9))
    final = [r.report.history[-1]["feature_loss"] for r in (on, off)]
    assert final[0] < 0.5 * final[1], final
    assert on.report.forget_acc_after[FORGET] <= 1.0


def test_head_prototypes_are_used_only_where_the_rows_are_their_classes_templates(digits_model, digits, tmp_path):
    # The same model with one vector added to every head row (same outputs, rows that no longer point
    # at their classes' features, as on the CIFAR-10 reference): the run goes without the feature term,
    # step for step the run that never had one, and says why.
    shifted = package_with(digits_model, tmp_path / "shifted", shift_rows=20.0)
    spec = (ForgetSpec(FORGET, str(digits.train_class(FORGET))),)
    common = dict(method="lora-kl", targets=("qkv", "proj", "fc1", "fc2"), adapter_blocks="later-half", lr=1e-2,
                  feature_tol=1e-6, max_steps=5, seed=0)
    head = dict(feature_weight=10.0, feature_prototypes="head")
    templates, not_templates, without = (
        unlearn(UnlearnInputs(model=str(model), forget=spec), UnlearnConfig(**common, **extra))
        for model, extra in ((digits_model, head), (shifted, head), (shifted, {})))
    assert templates.report.feature_term["applied"] and "feature_loss" in templates.report.history[-1]
    assert templates.report.feature_term["head_row_cosine"][FORGET] >= 0.9
    assert not not_templates.report.feature_term["applied"] and "feature_loss" not in not_templates.report.history[-1]
    assert not_templates.report.feature_term["head_row_cosine"][FORGET] < 0.5
    assert without.report.feature_term is None
    # The service reads the same cosine before the run, to choose its setting (ForgetSetFacts.row_cosine).
    for model, run_ in ((digits_model, templates), (shifted, not_templates)):
        cosine = forget_set_facts(str(model), spec, with_row_cosine=True)[FORGET].row_cosine
        assert cosine == pytest.approx(run_.report.feature_term["head_row_cosine"][FORGET], abs=1e-3)
    for name, weights in without.state_dict.items():
        assert torch.equal(not_templates.state_dict[name], weights), name


def test_a_synthetic_anchor_holds_the_kept_classes_where_the_original_has_them(digits_model, digits):
    # A run that moves the kept classes (a heavy feature term at lr 1e-2 on every linear of the later
    # half), without the anchor synthesised from the original alone, with it, and with its features
    # held too: on the test split's images of the other digits, which no run sees, the anchored
    # model's outputs stay nearer the original's, and holding the features keeps those nearer still.
    common = dict(method="lora-kl", targets=("qkv", "proj", "fc1", "fc2"), adapter_blocks="later-half", lr=1e-2,
                  feature_weight=30.0, feature_tol=1e-6, max_steps=60, seed=0)
    runs = [run(digits_model, digits, **common, **extra) for extra in
            ({}, {"synthetic_anchor": True}, {"synthetic_anchor": True, "anchor_feature_weight": 10.0})]
    loaded = load_package(digits_model)
    test = read_images(str(digits.test), loaded.card.input)
    others = normalise(test.pixels[test.label_indices(loaded.card.classes) != loaded.card.class_index(FORGET)],
                       loaded.card.input)

    @torch.no_grad()
    def outputs(state_dict: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probabilities, pre-logit features) on the other digits' test images."""
        vit = build_model(loaded.card, state_dict)
        found = features(vit, others, batch_size=512)
        return vit.head(found).log_softmax(1), found

    original_logp, original_features = outputs(loaded.state_dict)
    moved = [outputs(r.state_dict) for r in runs]
    output_drift = [torch.nn.functional.kl_div(logp, original_logp, log_target=True, reduction="batchmean").item()
                    for logp, _ in moved]
    feature_drift = [(f - original_features).pow(2).sum(1).mean().item() for _, f in moved]
    assert output_drift[1] < output_drift[0], output_drift
    assert feature_drift[2] < feature_drift[1], feature_drift
    assert all(r.report.forget_acc_after[FORGET] <= 1.0 for r in runs)
    kept = len(loaded.card.classes) - 1  # the forgotten class gets no anchor inputs
    assert [r.report.synthetic_anchor_images for r in runs] == [0, SYNTHESISED_PER_CLASS * kept, SYNTHESISED_PER_CLASS * kept]
    assert runs[0].report.anchor_images == runs[1].report.anchor_images == 0  # no anchor source


def test_anchor_settings_that_could_not_act_are_refused(digits_model, digits, retain_manifest):
    with pytest.raises(ConfigError, match="anchor_feature_weight holds an anchor's features"):
        run(digits_model, digits, method="lora-kl", anchor_feature_weight=10.0)
    with pytest.raises(ConfigError, match="synthetic_anchor is for retain-free methods"):
        run(digits_model, digits, retain=retain_manifest, method="ng-retain", synthetic_anchor=True)
    with pytest.raises(ConfigError, match="boundary_anchor extends synthetic_anchor"):
        run(digits_model, digits, method="lora-kl", boundary_anchor=True)


def test_a_boundary_anchor_adds_one_input_between_each_kept_input_and_its_nearest_kept_class(digits_model, digits):
    report = run(digits_model, digits, method="lora-kl", synthetic_anchor=True, boundary_anchor=True,
                 max_steps=1, seed=0).report
    kept = len(load_package(digits_model).card.classes) - 1
    assert report.synthetic_anchor_images == 2 * SYNTHESISED_PER_CLASS * kept


def test_a_single_kept_class_has_no_boundary_to_synthesise(digits_model, digits):
    forget = tuple(ForgetSpec(d, str(digits.train_class(d))) for d in "123456789")  # digit 0 alone kept
    report = run(digits_model, digits, forget=forget, method="lora-kl", synthetic_anchor=True, boundary_anchor=True,
                 max_steps=1, seed=0).report
    assert report.synthetic_anchor_images == SYNTHESISED_PER_CLASS


# --- the class-direction erasure (config.erase_weight): trained on the evaluation set's selection half ---

ERASE = dict(method="lora-kl", eval_halves=True)


def class_gap(card: ModelCard, state_dict: dict, source: Path, forget: str = FORGET) -> float:
    """The squared distance between the class's mean pre-logit feature and the other classes' on a
    labelled split's images: 0 where no one-against-the-rest linear probe finds the class."""
    images = read_images(str(source), card.input)
    labels = images.label_indices(card.classes)
    found = features(build_model(card, state_dict), normalise(images.pixels, card.input), batch_size=512)
    mine = labels == card.class_index(forget)
    return (found[mine].mean(0) - found[~mine].mean(0)).pow(2).sum().item()


def test_the_erasure_closes_the_class_s_gap_on_images_it_never_saw(digits_model, digits):
    # The same 30 steps (an erasure stop rule no run meets), with the term and with it all but off:
    # on the test split, which no run sees, the forgotten class's mean feature ends nearer the other
    # classes' with the term: it learned the class's direction, not the selection half's images.
    common = dict(ERASE, erase_tol=1e-6, max_steps=30, seed=0)
    on, off = (run(digits_model, digits, eval_source=digits.val, erase_weight=w, **common) for w in (1.0, 1e-9))
    assert on.report.steps == off.report.steps == 30
    loaded = load_package(digits_model)
    original, erased, plain = (class_gap(loaded.card, s, digits.test)
                               for s in (loaded.state_dict, on.state_dict, off.state_dict))
    assert erased < plain < original, (original, plain, erased)
    assert on.report.erasure["gap"][FORGET] < off.report.erasure["gap"][FORGET]
    assert "erase_gap" in on.report.history[-1]
    assert on.report.forget_acc_after[FORGET] <= 1.0
    assert off.report.erasure is not None and run(digits_model, digits, max_steps=1).report.erasure is None


def test_the_erasure_holds_the_kept_classes_outputs_on_the_half_s_images(digits_model, digits):
    # A heavy erasure (weight 10, 30 steps) with its hold on the kept classes' outputs and with the hold
    # all but off: on the test split's images of the other digits, which no run sees, the held model's
    # outputs stay nearer the original's.
    common = dict(ERASE, erase_weight=10.0, erase_tol=1e-6, max_steps=30, seed=0)
    held, loose = (run(digits_model, digits, eval_source=digits.val, anchor_weight=w, **common) for w in (1.0, 1e-6))
    loaded = load_package(digits_model)
    test = read_images(str(digits.test), loaded.card.input)
    others = normalise(test.pixels[test.label_indices(loaded.card.classes) != loaded.card.class_index(FORGET)],
                       loaded.card.input)

    @torch.no_grad()
    def log_probs(state_dict: dict) -> torch.Tensor:
        return build_model(loaded.card, state_dict).eval()(others).log_softmax(1)

    original = log_probs(loaded.state_dict)
    drift = [torch.nn.functional.kl_div(log_probs(r.state_dict), original, log_target=True, reduction="batchmean").item()
             for r in (held, loose)]
    assert drift[0] < drift[1], drift


def test_the_erasure_trains_on_the_selection_half_alone(digits_model, digits):
    # The audit half, which the gate and the evidence read, is never trained on: the erasure holds
    # exactly the selection half's images.
    loaded = load_package(digits_model)
    val = read_images(str(digits.val), loaded.card.input)
    halves = split_halves([loaded.card.classes[i] for i in val.label_indices(loaded.card.classes).tolist()], val.sha256)
    report = run(digits_model, digits, eval_source=digits.val, erase_weight=1.0, max_steps=2, **ERASE).report
    assert report.erasure["half"] == "selection" and report.erasure["images"] == int(halves.selection.sum())
    assert report.evaluation.half == "audit" and report.evaluation.images == int(halves.audit.sum())


def test_the_erasure_aims_every_few_steps_and_judges_its_stop_rule_on_a_fresh_aim(digits_model, digits):
    # 10 steps that never meet the stop rule aim before steps 1 and 6; aiming before every step, 10 times.
    def aims(report) -> int:
        return next(v["count"] for k, v in report.timings.items() if k.endswith("erasure aim"))

    common = dict(ERASE, erase_weight=1.0, erase_tol=1e-6, max_steps=10, seed=0)
    every_5, every_step = (run(digits_model, digits, eval_source=digits.val, erase_aim_every=k, **common).report
                           for k in (5, 1))
    assert (aims(every_5), aims(every_step)) == (2, 10)
    # A run that meets its stop rule stops on weights whose gap was measured on them, not steps before:
    # its last step applies no update, and the gap it stopped on is the written weights' own.
    met = run(digits_model, digits, eval_source=digits.val, **dict(common, erase_tol=0.8, max_steps=100)).report
    assert met.target_met and met.stop_rule_met and met.steps < 100 and not met.history[-1]["updated"]
    assert met.history[-1]["erase_gap"] == pytest.approx(met.erasure["gap"][FORGET], abs=1e-4)
    assert met.erasure["gap"][FORGET] <= 0.8


def test_a_run_with_nothing_left_to_forget_still_trains_until_the_erasure_s_stop_rule_is_met(digits_model, digits):
    # A target of 100 % is met before any step: without the erasure (or at erase_tol 1) nothing runs.
    common = dict(ERASE, target_forget_acc=100.0, max_steps=60, seed=0)
    loose, strict = (run(digits_model, digits, eval_source=digits.val, erase_weight=1.0, erase_tol=t, **common).report
                     for t in (1.0, 0.8))
    assert loose.steps == 0 and loose.stop_rule_met
    assert 0 < strict.steps < 60 and strict.stop_rule_met and strict.erasure["gap"][FORGET] <= 0.8


def test_the_erasure_runs_beside_neighbours_random_views_a_frozen_front_and_two_classes(digits_model, digits):
    # Every part a step's batch can hold, in the order the loss reads them back, with the frozen front's
    # tokens cached: each class gets its own direction and gap.
    forget = tuple(ForgetSpec(d, str(digits.train_class(d))) for d in ("3", "8"))
    report = run(digits_model, digits, forget=forget, eval_source=digits.val, method="lora-adv", eval_halves=True,
                 adapter_blocks="later-half", augment=True, erase_weight=1.0, erase_tol=1e-6, max_steps=3, seed=0).report
    assert report.steps == 3 and set(report.erasure["gap"]) == {"3", "8"}
    assert all(0 < g for g in report.erasure["gap"].values())


def test_the_generalisation_check_s_folds_train_with_the_erasure_too(digits_model, digits):
    report = run(digits_model, digits, eval_source=digits.val, erase_weight=1.0, holdout_folds=2, holdout_images=5,
                 max_steps=5, seed=0, **ERASE).report
    assert report.holdout.folds_run >= 1 and report.erasure is not None


def test_erasure_settings_that_could_not_act_or_would_train_on_the_audit_half_are_refused(digits_model, digits,
                                                                                           retain_manifest, tmp_path):
    with pytest.raises(ConfigError, match="set eval_halves"):
        UnlearnConfig(method="lora-kl", erase_weight=1.0)
    with pytest.raises(ConfigError, match="eval_halves needs a labelled evaluation source"):
        run(digits_model, digits, erase_weight=1.0, **ERASE)
    with pytest.raises(ConfigError, match="erase_tol is the erasure's stop rule"):
        UnlearnConfig(erase_tol=0.5)
    with pytest.raises(ConfigError, match="trains on retain data; erase_weight adds the selection half"):
        UnlearnConfig(method="ng-retain", eval_halves=True, erase_weight=1.0)
    with pytest.raises(ConfigError, match="that select_on_eval chooses the checkpoint on"):
        UnlearnConfig(**ERASE, erase_weight=1.0, select_on_eval=True)
    for bad, match in (({"erase_weight": -1.0}, "erase_weight must be"), ({"erase_weight": float("nan")}, "erase_weight must be"),
                       ({"erase_weight": 1.0, "erase_tol": 0.0}, "erase_tol must be"),
                       ({"erase_weight": 1.0, "erase_tol": 1.5}, "erase_tol must be"),
                       ({"erase_weight": 1.0, "erase_aim_every": 0}, "erase_aim_every must be")):
        with pytest.raises(ConfigError, match=match):
            UnlearnConfig(**ERASE, **bad)
    # A class with one image in the evaluation set has it in the audit half: nothing to erase along.
    sparse = tmp_path / "val"
    for folder in digits.val.iterdir():
        files = sorted(folder.iterdir())[:1 if folder.name == FORGET else None]
        (sparse / folder.name).mkdir(parents=True)
        for f in files:
            (sparse / folder.name / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ImageSourceError, match="selection half holds no image of '3'"):
        run(digits_model, digits, eval_source=sparse, erase_weight=1.0, **ERASE)
