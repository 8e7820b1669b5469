"""benchmarks/paper_table.py: its plan, its choice of grid point, its summary against the targets,
and a smoke run on the reference model at tiny sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks import paper_table
from benchmarks.paper_table import Task, best_grid_point, claim, held, parse_args, plan, summarise


def record(variant: str, class_name: str, seed: int, acc_f: float, acc_r: float, *, original_acc_r: float = 80.0,
           phase: str = "main", steps: int = 5, target_met: bool = True, **extra) -> dict:
    return {"phase": phase, "variant": variant, "method": paper_table.VARIANTS[variant].method, "class": class_name,
            "seed": seed, "forget_images": 500, "task": f"{phase}/{variant}/{class_name}-s{seed}", "settings": {},
            "config": {"lr": 1e-2, "l1_weight": 1e-3, "rank": 8, "targets": ["qkv"], "select_on_eval": False},
            "steps": steps, "target_met": target_met, "seconds": 10.0, "peak_memory_mib": 100.0,
            "trainable_parameters": 36864, "acc_f": acc_f, "acc_r": acc_r, "original_acc_f": 70.0,
            "original_acc_r": original_acc_r} | extra


# --- the plan --------------------------------------------------------------------------------

def test_grid_points_come_first_then_the_rows_the_targets_are_judged_on():
    tasks = plan(parse_args(["--classes", "cat", "dog", "--sweep", "", "--few-shot"]))
    phases = [t.phase for t in tasks]
    assert phases == sorted(phases, key=["grid", "main"].index)
    main = [t for t in tasks if t.phase == "main"]
    first_other = next(i for i, t in enumerate(main) if paper_table.VARIANTS[t.variant].tier > 0)
    assert {t.variant for t in main[:first_other]} == {"lora-bounded", "lora-kl", "lora-kl-late", "lora-kl-late-3e-3",
                                                            "lora-kl-late-3e-3-b128", "ng-l1"}
    assert {t.seed for t in main[:first_other]} == {0, 1, 2}


def test_only_the_variants_named_for_every_seed_run_more_than_the_first_seed():
    tasks = plan(parse_args(["--classes", "cat", "--sweep", "", "--few-shot", "--seeds", "4", "5"]))
    seeds = {}
    for t in tasks:
        if t.phase == "main":
            seeds.setdefault(t.variant, set()).add(t.seed)
    assert seeds["lora-bounded"] == seeds["ng-l1"] == {4, 5}
    assert seeds["finetune"] == seeds["lora-adv"] == {4}
    assert all(t.seed == 4 for t in tasks if t.phase == "grid")


def test_the_few_shot_size_equal_to_the_main_forget_set_reuses_the_main_run():
    tasks = plan(parse_args(["--classes", "cat", "--variants", "lora-kl", "--sweep", "", "--few-shot", "10", "500"]))
    assert [(t.variant, t.forget_images) for t in tasks if t.phase == "few-shot"] == [("lora-bounded", 10),
                                                                                     ("lora-kl-late-3e-3", 10)]


def test_a_task_key_names_its_phase_variant_class_seed_size_and_settings():
    task = Task("grid", "ng-l1", "cat", 0, 500, (("lr", 5e-5), ("targets", ("qkv", "fc1"))))
    assert task.key == "grid/ng-l1/cat-s0-n500-lr=5e-05-targets=qkv+fc1"
    assert task.split == "val" and Task("main", "ng-l1", "cat", 0, None).split == "test"


# --- the grid choice -------------------------------------------------------------------------

def test_the_grid_prefers_points_within_the_forget_target_then_the_highest_retain_accuracy():
    points = [record("lora-kl", "cat", 0, 0.4, 76.0, phase="grid", settings={"lr": 1e-2}),
              record("lora-kl", "cat", 0, 0.9, 77.0, phase="grid", settings={"lr": 3e-3}),
              record("lora-kl", "cat", 0, 1.5, 79.0, phase="grid", settings={"lr": 1e-3}),
              record("lora-kl", "cat", 0, 30.0, 80.0, phase="grid", target_met=False, settings={"lr": 1e-4})]
    assert best_grid_point(points)["settings"] == {"lr": 3e-3}


def test_without_a_point_within_the_target_the_grid_uses_the_papers_score_and_never_a_failed_point():
    points = [record("lora-kl", "cat", 0, 2.0, 76.0, phase="grid", settings={"lr": 1e-2}),
              record("lora-kl", "cat", 0, 5.0, 78.0, phase="grid", settings={"lr": 3e-3}),
              {"phase": "grid", "variant": "lora-kl", "settings": {"lr": 1.0}, "task": "x", "error": "diverged"}]
    assert best_grid_point(points)["settings"] == {"lr": 1e-2}


# --- the summary -----------------------------------------------------------------------------

def test_the_summary_averages_classes_per_seed_and_reports_the_worst_seed():
    records = [record("lora-kl", c, s, acc_f, acc_r) for c, s, acc_f, acc_r in
               [("cat", 0, 0.0, 80.0), ("dog", 0, 1.0, 79.0), ("cat", 1, 2.0, 78.0), ("dog", 1, 0.0, 78.0)]]
    row = summarise(records, ["cat", "dog"], 500)["rows"][0]
    assert row["acc_f"]["mean"] == pytest.approx(0.75) and row["acc_r"]["mean"] == pytest.approx(78.75)
    assert row["worst_seed"] == {"acc_f": 1.0, "acc_r_change": pytest.approx(-2.0)}
    assert row["complete_seeds"] == 2


def test_the_verdict_checks_every_seed_against_the_targets_and_ng_l1():
    records = []
    for seed in (0, 1):
        records += [record("lora-kl", c, seed, 0.5, 79.6) for c in ("cat", "dog")]
        records += [record("ng-l1", c, seed, 0.5, 78.0) for c in ("cat", "dog")]
        records += [record("lora-bounded", c, seed, 0.5 if seed == 0 else 1.5, 79.9) for c in ("cat", "dog")]
    rows = {r["variant"]: r for r in summarise(records, ["cat", "dog"], 500)["rows"]}
    assert rows["lora-kl"]["verdict"] == {"seeds_judged": 2, "forget_target": True, "retain_target": True,
                                          "beats_ng_l1": True}
    assert rows["ng-l1"]["verdict"]["retain_target"] is False
    assert rows["lora-bounded"]["verdict"]["forget_target"] is False  # one seed over 1.0 is enough to miss


def test_a_seed_missing_a_class_is_shown_but_not_judged():
    records = [record("lora-kl", "cat", 0, 0.0, 80.0)]
    row = summarise(records, ["cat", "dog"], 500)["rows"][0]
    assert row["seeds"][0]["classes"] == 1 and not row["seeds"][0]["complete"]
    assert row["verdict"] is None


def test_a_run_that_failed_counts_as_missing_and_is_named():
    records = [record("ng-l1", "cat", 0, 0.0, 80.0),
               {"phase": "main", "variant": "ng-l1", "class": "dog", "seed": 0, "forget_images": 500, "error": "x"}]
    row = summarise(records, ["cat", "dog"], 500)["rows"][0]
    assert row["seeds"][0]["failed"] == ["dog"] and not row["seeds"][0]["complete"]


def test_the_report_is_written_as_markdown_json_and_charts(tmp_path):
    records = [record(v, c, 0, 0.5, 79.0) for v in ("lora-bounded", "ng-l1", "finetune") for c in ("cat", "dog")]
    records += [record("lora-bounded", "cat", 0, 3.0, 78.0, phase="few-shot", forget_images=10)]
    summary = summarise(records, ["cat", "dog"], 500)
    paper_table.write_report(summary, {"generated": "now", "command": "x", "machine": "m", "model": "m",
                                       "forget_images": 500, "test_images": 5000}, tmp_path)
    markdown = (tmp_path / "paper_table.md").read_text()
    assert "| lora-bounded | ✗ | 2 | 79.00 ± 0.00 | 0.50 ± 0.00 | -1.00 ± 0.00 |" in markdown
    assert json.loads((tmp_path / "paper_table.json").read_text())["rows"][0]["variant"] == "lora-bounded"
    assert (tmp_path / "paper_table.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "paper_table_few_shot.png").is_file()


# --- claiming tasks across processes ---------------------------------------------------------

def test_a_lock_is_taken_once_and_a_dead_processs_lock_is_reclaimed(tmp_path):
    lock = tmp_path / "runs" / "task.lock"
    assert claim(lock) and held(lock)
    assert not claim(lock)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(f"{os.uname().nodename} {dead.stdout.strip()}")
    assert not held(lock) and claim(lock)


def test_bad_arguments_are_one_line_errors(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--forget-images", "some"])
    assert "'some' is not a number of images or 'all'" in capsys.readouterr().err
    assert paper_table.main(["--model", "/nonexistent", "--report-only"]) == 2
    assert "reference model package not found" in capsys.readouterr().err


# --- smoke run on the reference model --------------------------------------------------------

def test_a_tiny_run_on_the_reference_model_writes_every_result_and_resumes(reference_model, cifar10, tmp_path,
                                                                           capsys):
    args = ["--model", str(reference_model), "--data", str(cifar10), "--results", str(tmp_path),
            "--variants", "lora-kl", "--classes", "cat", "--seeds", "0", "--forget-images", "8",
            "--max-steps", "1", "--eval-per-class", "3", "--few-shot", "4", "--few-shot-variants", "lora-kl",
            "--sweep", ""]
    assert paper_table.main(args) == 0
    runs = sorted(str(p.relative_to(tmp_path / "paper_table-runs")) for p in tmp_path.rglob("*.json")
                  if "runs" in str(p))
    chosen = runs[-1].removeprefix("main/lora-kl/cat-s0-n8")  # the grid's choice names the main runs
    assert chosen in ("-lr=0.001.json", "-lr=0.003.json", "-lr=0.01.json")
    assert runs == [f"few-shot/lora-kl/cat-s0-n4{chosen}", "grid/lora-kl/cat-s0-n8-lr=0.001.json",
                    "grid/lora-kl/cat-s0-n8-lr=0.003.json", "grid/lora-kl/cat-s0-n8-lr=0.01.json",
                    f"main/lora-kl/cat-s0-n8{chosen}"]
    main = json.loads((tmp_path / "paper_table-runs" / f"main/lora-kl/cat-s0-n8{chosen}").read_text())
    assert main["split"] == "test" and main["steps_run"] <= 1 and 0 <= main["acc_r"] <= 100
    assert main["settings"]["lr"] == float(chosen.removeprefix("-lr=").removesuffix(".json"))
    summary = json.loads((tmp_path / "paper_table.json").read_text())
    assert summary["rows"][0]["variant"] == "lora-kl" and summary["meta"]["test_images"] == 30
    capsys.readouterr()
    assert paper_table.main(args) == 0  # resumes: every task has its file, nothing runs again
    assert "left]" not in capsys.readouterr().out
    grid = tmp_path / "paper_table-runs" / "grid" / "lora-kl"
    other = next(lr for lr in ("0.001", "0.003", "0.01") if chosen != f"-lr={lr}.json")
    for point in grid.iterdir():  # a different grid outcome: the old main runs no longer count
        result = json.loads(point.read_text())
        result["acc_r"] = 99.0 if point.name == f"cat-s0-n8-lr={other}.json" else 1.0
        result["acc_f"], result["target_met"] = 0.0, True
        point.write_text(json.dumps(result))
    bench = paper_table.Bench(parse_args(args))
    assert bench.name(Task("main", "lora-kl", "cat", 0, 8)) == f"main/lora-kl/cat-s0-n8-lr={other}"
    assert bench.current(paper_table.load_runs(bench.runs)) == paper_table.load_runs(grid)


def test_the_sweep_runs_each_change_next_to_the_unchanged_setting_on_each_sweep_class():
    tasks = plan(parse_args(["--classes", "cat", "--variants", "lora-kl", "--few-shot",
                             "--sweep-classes", "airplane", "frog"]))
    sweep = [t for t in tasks if t.phase == "sweep"]
    assert {t.class_name for t in sweep} == {"airplane", "frog"}
    for name in ("airplane", "frog"):
        points = [t.settings for t in sweep if t.class_name == name]
        assert () in points  # the grid's choice itself, on the same class and split
        assert all(len(p) == 1 for p in points if p)  # one setting changed at a time
        assert len(points) == 1 + sum(len(v) for v in paper_table.SWEEP.values())
    assert all(t.split == "val" for t in sweep)


def test_the_sweep_can_be_limited_to_some_settings():
    tasks = plan(parse_args(["--classes", "cat", "--variants", "lora-kl-late", "--few-shot", "--sweep", "lora-kl-late",
                             "--sweep-classes", "airplane", "--sweep-settings", "lr"]))
    assert [t.settings for t in tasks if t.phase == "sweep"] == [(), (("lr", 3e-3),), (("lr", 1e-3),)]
