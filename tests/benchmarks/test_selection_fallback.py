"""benchmarks/selection_fallback.py: what it says without its data, and how it renders a record (the
run itself needs ../shared's CIFAR-10 and takes ~5 minutes: a benchmark, not a test)."""

from __future__ import annotations

from benchmarks import selection_fallback


def test_missing_data_is_one_line_and_exit_2(tmp_path, capsys):
    assert selection_fallback.main(["--cifar", str(tmp_path / "none"), "--out", str(tmp_path / "out.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("selection_fallback: ") and err.count("\n") == 1
    assert not (tmp_path / "out.json").exists()


def test_a_record_renders_each_run_and_a_fallback_beside_the_last_step_it_replaced():
    kept = {"step": 40, "steps_run": 45, "acc_f": 0.0, "acc_r": 72.7, "seconds": 17.5}
    record = {"forget_images": 20, "eval_images": 1000, "seed": 0, "runs": [
        {"class": "airplane", "selected_by": "stop rule", **kept},
        {"class": "cat", "selected_by": "target", **kept, "step": 61, "steps_run": 100,
         "before_fallback": {**kept, "step": 100, "acc_f": 4.0, "acc_r": 70.1}}]}
    text = selection_fallback.render(record)
    assert "1 of 2 runs reached no checkpoint at the margin" in text
    assert "| airplane | stop rule | 40 / 45 | 0.0 | 72.7 | 17.5 |  |" in text
    assert "| cat | target | 61 / 100 | 0.0 | 72.7 | 17.5 | 100, 4.0, 70.1 |" in text
