"""benchmarks/oracle.py: a tiny run on the digits model (original, an oracle retrained without the
class, the service's and the paper's method, measured alike), and how records of variant runs merge."""

from __future__ import annotations

import json

from benchmarks import oracle


def test_one_digit_against_its_oracle_is_measured_and_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("LETHE_BENCH_CACHE", str(tmp_path / "cache"))
    # A short recipe (10 epochs): the script's path, not the figures, is what this checks.
    assert oracle.main(["--domain", "digits", "--classes", "3", "--epochs", "10", "--results", str(tmp_path)]) == 0
    (record,) = json.loads((tmp_path / "oracle.json").read_text())["runs"]
    assert set(record["models"]) == {"original", "oracle", "service", "paper"}
    never_saw = record["models"]["oracle"]
    assert never_saw["acc_f"] == 0.0 and record["models"]["original"]["acc_f"] > 50  # the oracle never predicts it
    assert all(m["probe"] is not None and m["relearn"] is not None for m in record["models"].values())
    assert "| digits | service | 1 |" in (tmp_path / "oracle.md").read_text()


def test_a_variant_runs_models_join_the_first_runs_record():
    first = {"domain": "digits", "class": "3", "seed": 0, "models": {"original": {"a": 1}, "service": {"a": 2}}}
    variant = {"domain": "digits", "class": "3", "seed": 0, "models": {"original": {"a": 9}, "every-block": {"a": 3}}}
    (merged,) = oracle.merged([first, variant])
    assert merged["models"] == {"original": {"a": 1}, "service": {"a": 2}, "every-block": {"a": 3}}
