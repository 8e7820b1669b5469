"""Smoke runs of the benchmark scripts at tiny sizes (they need ../shared: the reference model and CIFAR-10)."""

import json

from benchmarks import engine_speed
from tests.conftest import SHARED


def test_engine_speed_benchmark_measures_a_run_on_the_reference_model(reference_model, tmp_path, monkeypatch):
    archive = SHARED / "datasets" / "cifar10" / "train.tar"
    monkeypatch.setenv("LETHE_BENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "speed.json"
    assert engine_speed.main(["--model", str(reference_model), "--data", str(archive), "--forget-images", "8",
                              "--max-steps", "1", "--out", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["forget_images"] == 8 and figures["steps_run"] <= 1
    assert figures["trainable_parameters"] == 6 * (8 * 192 + 576 * 8)  # LoRA r=8 on 6 qkv layers
    assert figures["unlearning_seconds"] > 0 and figures["peak_memory_mib"] is not None


def test_engine_speed_benchmark_names_a_missing_model(tmp_path, capsys):
    assert engine_speed.main(["--model", str(tmp_path / "none"), "--out", str(tmp_path / "x.json")]) == 2
    assert "reference model package not found" in capsys.readouterr().err
