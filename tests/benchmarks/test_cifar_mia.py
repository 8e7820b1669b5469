"""benchmarks/cifar_mia.py: what it says without its data, and how it renders a record (the run
itself needs ../shared's CIFAR-10 and takes ~10 minutes: a benchmark, not a test)."""

from __future__ import annotations

from benchmarks import cifar_mia


def test_missing_data_is_one_line_and_exit_2(tmp_path, capsys):
    assert cifar_mia.main(["--cifar", str(tmp_path / "none"), "--out", str(tmp_path / "out.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cifar_mia: ") and err.count("\n") == 1
    assert not (tmp_path / "out.json").exists()


def test_a_record_renders_each_side_and_every_seed():
    side = {"acc_r": 74.4, "members_mean": 1.101, "members_sd": 0.11, "non_members_mean": 1.125,
            "non_members_sd": 0.12, "mia": [54.2, 54.1, 54.0, 53.9], "probe": [66.4, 67.2, 68.2, 66.4]}
    text = cifar_mia.render({"models": {"service": {**side, "steps": 16}},
                             "face_row_cosines": {"a": 0.83, "b": 0.93}})
    assert "| service | 74.4 | 1.101 ± 0.11 | 1.125 ± 0.12 | 54.2, 54.1, 54.0, 53.9 | 66.4, 67.2, 68.2, 66.4 | 16 |" in text
    assert "0.83-0.93" in text
