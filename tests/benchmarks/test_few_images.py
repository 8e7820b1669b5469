"""benchmarks/few_images.py: its plan, its summary (held-out Acc_f, the worst class, the drop) and how
it scores the generalisation check against the held-out figures; a tiny run on the digits model."""

from __future__ import annotations

import json

from benchmarks import few_images
from benchmarks.few_images import holdout_summary, parse_args, plan, summarise
from tests.benchmarks.conftest import write_archives


def record(variant: str, cls: str, seed: int, acc_f: float, drop: float, check: float | None = None, **extra) -> dict:
    r = {"domain": "faces", "variant": variant, "class": cls, "seed": seed, "forget_images": 9,
         "holdout_check": check is not None, "acc_f": acc_f, "original_acc_f": 100.0, "acc_r": 80.0 - drop,
         "original_acc_r": 80.0, "target_met": True, "steps": 10, "seconds": 1.0} | extra
    if check is not None:
        r["holdout"] = {"forget_acc": check, "held_back": 9, "folds_run": 3, "steps": [5, 5, 5], "seconds": 2.0}
    return r


def test_the_plan_covers_every_variant_and_class_of_a_seed_before_the_next_seed():
    args = parse_args(["--domain", "faces", "--variants", "lora-kl-late", "late-aug", "--seeds", "0", "1"])
    tasks = plan(args, ["a", "b"])
    assert [t.seed for t in tasks] == [0] * 8 + [1] * 8
    assert {t.forget_images for t in tasks} == {9, 7}  # every image, and leave-some-out
    assert tasks[0].key == "faces/lora-kl-late/a-s0-n9"


def test_a_summary_row_reports_the_mean_the_worst_class_and_the_worst_drop():
    rows = summarise([record("lora-kl-late", "a", 0, 0.0, 1.0), record("lora-kl-late", "a", 1, 50.0, 3.0),
                      record("lora-kl-late", "b", 0, 100.0, -1.0)])
    (row,) = rows
    assert row["acc_f"] == 50.0 and row["worst_class_acc_f"] == 100.0 and row["runs_acc_f_over_50"] == 1
    assert row["drop"] == 1.0 and row["worst_drop"] == 3.0 and (row["classes"], row["seeds"]) == (2, 2)


def test_the_check_is_scored_by_the_runs_it_fails_and_the_silent_failures_it_passes():
    runs = [record("v", "a", 0, 100.0, 0.0, check=44.4), record("v", "b", 0, 0.0, 0.0, check=11.1),
            record("v", "c", 0, 100.0, 0.0, check=0.0)]
    gates = {g["max_holdout_acc"]: g for g in holdout_summary(runs, gates=(0.0, 30.0))["gates"]}
    assert gates[30.0]["failed"] == 1 and gates[30.0]["passed_but_held_out_over_50"] == 1
    assert gates[0.0]["failed"] == 2 and gates[0.0]["passed_but_held_out_over_50"] == 1


def test_a_tiny_run_on_the_digits_model_writes_its_records_and_the_report(tmp_path, bench_cache):
    archives = write_archives(tmp_path / "cifar", ("cat", "dog"), train=2, test=4)  # the anchor's source only
    code = few_images.main(["--domain", "digits", "--classes", "3", "--sizes", "8", "--seeds", "0", "--variants",
                            "lora-kl-late", "--holdout-variants", "lora-kl-late", "--results", str(tmp_path),
                            "--cifar", str(archives), "--threads", "1"])
    assert code == 0
    records = [json.loads(p.read_text()) for p in (tmp_path / "few_images-runs").rglob("*.json")]
    assert len(records) == 2 and {r["holdout_check"] for r in records} == {True, False}
    checked = next(r for r in records if r["holdout_check"])
    assert checked["holdout"]["held_back"] == 8 and checked["forget_set_size"] == 8
    assert "## digits" in (tmp_path / "few_images.md").read_text()
