"""The ``lethe unlearn`` command: writes a package and a report; bad input is one line and exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from service.cli import EXIT_BAD_INPUT, EXIT_TARGET_MISSED, main, summary_line
from worker.engine.package import load_package


def unlearn_args(model: Path, digits, out: Path, *extra: str) -> list[str]:
    return ["unlearn", "--model", str(model), "--forget", f"3={digits.train_class('3')}", "--out", str(out), *extra]


def test_unlearn_writes_the_package_and_the_report(digits_model, digits, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(unlearn_args(digits_model, digits, out, "--eval", f"file://{digits.test}", "--seed", "1"))
    captured = capsys.readouterr()
    assert code == 0
    assert captured.out.strip().splitlines()[-1] == str(out / "report.json")
    assert "step 1/100" in captured.err and "held-out Acc_f" in captured.err
    report = json.loads((out / "report.json").read_text())
    assert report["target_met"] and report["config"]["seed"] == 1 and report["evaluation"]["images"] > 0
    package = load_package(out)
    assert report["weights_sha256"] == package.weights_sha256
    assert package.card.forgotten_classes == ["3"]


def test_a_missed_target_writes_no_model_unless_allowed(digits_model, digits, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(unlearn_args(digits_model, digits, out, "--max-steps", "1")) == EXIT_TARGET_MISSED
    captured = capsys.readouterr()
    assert "target not met" in captured.err
    report_path = tmp_path / "out.report.json"  # beside OUT_DIR, which stays free for the next attempt
    assert captured.out.strip().splitlines()[-1] == str(report_path) and not out.exists()
    assert json.loads(report_path.read_text())["target_met"] is False

    assert main(unlearn_args(digits_model, digits, out, "--max-steps", "1", "--allow-miss")) == 0
    assert (out / "model.safetensors").is_file()


def test_an_existing_report_file_is_never_overwritten(digits_model, digits, tmp_path, capsys):
    card = digits_model / "model.json"
    before = card.read_text()
    assert main(unlearn_args(digits_model, digits, tmp_path / "out", "--report", str(card))) == EXIT_BAD_INPUT
    assert "the report file exists already" in capsys.readouterr().err
    assert card.read_text() == before


def test_the_generalisation_check_on_one_photo_is_refused_before_training(digits_model, digits, tmp_path, capsys):
    copies = tmp_path / "copies"
    copies.mkdir()
    photo = sorted(digits.train_class("3").iterdir())[0]
    for i in range(4):  # one photo, four files
        (copies / f"{i}.png").write_bytes(photo.read_bytes())
    args = unlearn_args(digits_model, digits, tmp_path / "out", "--holdout-folds", "3")
    args[args.index("--forget") + 1] = f"3={copies}"
    assert main(args) == EXIT_BAD_INPUT
    assert "holds 1 different photo(s); the generalisation check needs at least 2" in capsys.readouterr().err
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("change, message", [
    (["--forget", "3"], "--forget expects CLASS=SOURCE"),
    (["--forget", "cat=/nowhere"], "'cat' is not one of the model's classes"),
    (["--forget", "3=/nowhere/at/all"], "/nowhere/at/all: no such file or directory"),
    (["--method", "finetune"], "needs a retain source"),
    (["--targets", "q_proj"], "no linear layers named 'q_proj'"),
    (["--rank", "0"], "--rank must be at least 1"),
    (["--select-on-eval"], "needs a labelled evaluation source"),
    (["--holdout-folds", "1"], "--holdout-folds must be 0"),
    (["--confirm-views", "-1"], "--confirm-views must be in [0, 64]"),
    (["--confirm-views", "1000000000"], "--confirm-views must be in [0, 64]"),
    (["--max-forget-prob", "0"], "--max-forget-prob is a probability"),
    (["--anchor-weight", "0"], "--anchor-weight must be in (0, 1000]"),
    (["--anchor-weight", "1e308"], "--anchor-weight must be in (0, 1000]"),
    (["--anchor", "/nowhere/anchor"], "/nowhere/anchor: no such file or directory"),
    (["--feature-weight", "-1"], "--feature-weight must be zero or positive"),
    (["--feature-weight", "nan"], "--feature-weight must be zero or positive"),
    (["--feature-weight", "1", "--method", "lora-bounded"], "needs an adapter method with a teacher-based forget term"),
    (["--feature-tol", "0"], "--feature-tol must be in (0, 1]"),
    (["--anchor-feature-weight", "-1"], "--anchor-feature-weight must be in [0, 1000]"),
    (["--target-temperature", "0"], "--target-temperature must be in [0.01, 100]"),
    (["--target-temperature", "0.5", "--method", "lora-bounded"], "--target-temperature is the masked-KL target's"),
    (["--feature-prototypes", "head"], "--feature-prototypes are the feature term's: set --feature-weight too"),
    (["--anchor-feature-weight", "inf"], "--anchor-feature-weight must be in [0, 1000]"),
    (["--boundary-anchor"], "--boundary-anchor extends --synthetic-anchor: set both"),
    (["--erase-weight", "1"], "--erase-weight trains on the evaluation set's selection half: set --eval-halves"),
    (["--erase-weight", "1", "--eval-halves"], "--eval-halves needs a labelled evaluation source"),
    (["--erase-weight", "-1"], "--erase-weight must be zero or positive"),
    (["--erase-tol", "0.5"], "--erase-tol is the erasure's stop rule: set --erase-weight too"),
    (["--holdout-images", "10"], "--holdout-images needs --holdout-folds"),
    (["--holdout-folds", "3", "--holdout-images", "0"], "--holdout-images must be at least 1"),
])
def test_bad_input_is_one_line_and_exit_2(change, message, digits_model, digits, tmp_path, capsys):
    args = unlearn_args(digits_model, digits, tmp_path / "out")
    if change[0] == "--forget":
        args[args.index("--forget") + 1] = change[1]
    else:
        args += change
    assert main(args) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lethe: error: ") and message in err[-1]
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_an_existing_output_is_never_overwritten(digits_model, digits, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(unlearn_args(digits_model, digits, out)) == EXIT_BAD_INPUT
    assert "exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_the_installed_command_prints_no_traceback(tmp_path):
    lethe = Path(sys.executable).with_name("lethe")
    command = [str(lethe)] if lethe.exists() else [sys.executable, "-m", "service.cli"]
    done = subprocess.run([*command, "unlearn", "--model", str(tmp_path / "nope"), "--forget", f"a={tmp_path}",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert done.returncode == EXIT_BAD_INPUT
    assert done.stderr.strip() == f"lethe: error: {tmp_path / 'nope'}: model package folder not found"


def test_serve_takes_a_number_of_api_processes_of_at_least_one(capsys):
    from service.cli import build_parser

    assert build_parser().parse_args(["serve", "--workers", "4"]).workers == 4
    assert build_parser().parse_args(["serve"]).workers == 1
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["serve", "--workers", "0"])
    assert exit_info.value.code == 2 and "must be at least 1" in capsys.readouterr().err


def test_the_generalisation_check_is_in_the_summary_and_the_report(digits_model, digits, tmp_path, capsys):
    # What is printed and recorded, whether or not this run reaches the target (--allow-miss).
    args = unlearn_args(digits_model, digits, tmp_path / "out") + ["--method", "lora-kl", "--holdout-folds", "3",
                                                                    "--augment", "--allow-miss"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "held-back images still recognised: 3 " in err and "of 3 folds" in err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["holdout"]["folds"] == 3 and report["config"]["augment"] is True


def test_the_summary_says_when_the_head_rows_were_not_templates_and_the_feature_term_did_not_run():
    report = {"forget_acc_before": {"3": 100.0}, "forget_acc_after": {"3": 0.0}, "steps": 9, "seconds": 1.0,
              "config": {"head_template_cosine": 0.9},
              "feature_term": {"applied": False, "prototypes": "head", "head_row_cosine": {"3": 0.61}}}
    assert "no feature term: the head's rows are not its classes' templates (row cosine 3 0.61 < 0.9)" in summary_line(report)
    report["feature_term"] |= {"applied": True, "head_row_cosine": {"3": 0.99}}
    assert "feature term" not in summary_line(report)


def test_the_summary_names_the_selected_checkpoint_and_what_it_met():
    report = {"forget_acc_before": {"3": 100.0}, "forget_acc_after": {"3": 0.0}, "steps": 7, "seconds": 1.0,
              "config": {"max_forget_prob": 0.05}, "target_met": True, "stop_rule_met": False,
              "selection": {"half": "selection", "best": {"step": 7}, "selected_by": "target"}}
    line = summary_line(report)
    assert "margin (views, probability bound or erasure gap) was not reached" in line
    assert "checkpoint of step 7 selected on the selection split (only forgot its images" in line
    report["selection"] |= {"selected_by": "stop rule"}
    assert "checkpoint of step 7 selected on the selection split" in summary_line(report)
    assert "only forgot" not in summary_line(report)
    report["selection"] |= {"best": None, "selected_by": None}
    assert "no checkpoint selected on the selection split (none forgot its images)" in summary_line(report)
    report["steps_run"] = 0  # nothing was trained: nothing to choose from, and nothing missed
    assert "no checkpoint to select: the forget sets met the target before any step" in summary_line(report)
