"""benchmarks/speed.py: each method in its own process on the same forget set, and the ratios."""

from __future__ import annotations

import json

from benchmarks import speed


def figures(method: str, seconds: float, optimizer_bytes: int) -> dict:
    return {"method": method, "unlearning_seconds": seconds, "seconds_per_step": seconds / 2,
            "total_seconds": seconds + 1, "process_peak_rss_mib": 1000.0, "cuda_peak_mib": None,
            "gradient_and_optimizer_bytes": optimizer_bytes, "trainable_parameters": optimizer_bytes // 12}


def test_every_method_is_compared_with_full_fine_tuning():
    ratios = speed.with_ratios([figures("lora-bounded", 5.0, 1200), figures("ng-l1", 20.0, 120000)])
    assert ratios["baseline"] == "ng-l1"
    assert ratios["ratios"]["lora-bounded"]["unlearning_seconds"] == 0.25
    assert ratios["ratios"]["lora-bounded"]["gradient_and_optimizer_bytes"] == 0.01
    assert ratios["ratios"]["lora-bounded"]["cuda_peak_mib"] is None


def test_without_the_baseline_there_are_no_ratios():
    assert speed.with_ratios([figures("lora-bounded", 5.0, 1200)]) == {"baseline": None, "ratios": {}}


def test_the_tuned_settings_are_the_paper_tables_grid_choice(tmp_path):
    grid = tmp_path / "grid" / "lora-kl"
    grid.mkdir(parents=True)
    for lr, acc_r in ((1e-2, 76.0), (3e-3, 77.0), (1e-3, 75.0)):
        (grid / f"cat-{lr}.json").write_text(json.dumps(
            {"phase": "grid", "variant": "lora-kl", "task": str(lr), "settings": {"lr": lr}, "steps": 3,
             "target_met": True, "acc_f": 0.5, "acc_r": acc_r}))
    assert speed.tuned_settings("lora-kl", tmp_path) == {"lr": 3e-3}
    assert speed.tuned_settings("lora-bounded", tmp_path) == {}  # the paper's method is never tuned
    (grid / "cat-0.001.json").unlink()
    assert speed.tuned_settings("lora-kl", tmp_path) == {}  # an incomplete grid is not a choice
    assert speed.tuned_settings("lora-kl-late", tmp_path) == {"lr": 1e-2, "adapter_blocks": "later-half"}  # fixed


def test_the_benchmark_measures_each_method_in_its_own_process(reference_model, cifar10, tmp_path):
    out = tmp_path / "speed.json"
    assert speed.main(["--model", str(reference_model), "--data", str(cifar10), "--forget-images", "8",
                       "--max-steps", "1", "--variants", "lora-bounded", "lora-kl-late", "ng-l1", "--tuned-from", str(tmp_path),
                       "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    lora, late, full = result["results"]
    assert lora["trainable_parameters"] == 6 * (8 * 192 + 576 * 8)  # LoRA r=8 on 6 qkv layers
    assert late["trainable_parameters"] == 3 * (8 * 192 + 576 * 8)  # blocks 3-5 only
    assert late["settings"]["cache_frozen_prefix"] and late["engine_method"] == "lora-kl"
    assert full["trainable_parameters"] > 50 * lora["trainable_parameters"]  # 2.7 M weights
    assert lora["process_peak_rss_mib"] > 0 and lora["steps_run"] <= 1
    assert result["ratios"]["lora-bounded"]["gradient_and_optimizer_bytes"] < 0.1


def test_a_missing_model_is_a_one_line_error(tmp_path, capsys):
    assert speed.main(["--model", str(tmp_path / "none"), "--out", str(tmp_path / "x.json")]) == 2
    assert "reference model package not found" in capsys.readouterr().err
