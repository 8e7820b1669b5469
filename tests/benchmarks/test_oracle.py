"""benchmarks/oracle.py: a tiny run on the digits model (original, an oracle retrained without the
class, the service's and the paper's method, measured alike), and how records of variant runs merge."""

from __future__ import annotations

import json

import pytest

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
    # A retraining added later joins the record alone: nothing else is measured again.
    assert oracle.main(["--domain", "digits", "--classes", "3", "--epochs", "10", "--results", str(tmp_path),
                        "--oracle-seeds", "2", "--oracles-only"]) == 0
    added = json.loads((tmp_path / "oracle-runs" / "digits-3-s0-oracles2-only.json").read_text())
    assert set(added["models"]) == {"oracle", "oracle-s1"}
    measures = ("acc_r", "probe", "mia", "relearn")
    assert [added["models"]["oracle"][m] for m in measures] == [record["models"]["oracle"][m] for m in measures]
    (record,) = json.loads((tmp_path / "oracle.json").read_text())["runs"]
    assert set(record["models"]) == {"original", "oracle", "oracle-s1", "service", "paper"}
    # ... and one more from a later seed alone, the earlier ones not trained or measured again.
    assert oracle.main(["--domain", "digits", "--classes", "3", "--epochs", "10", "--results", str(tmp_path),
                        "--oracle-seeds", "3", "--first-oracle-seed", "2", "--oracles-only"]) == 0
    added = json.loads((tmp_path / "oracle-runs" / "digits-3-s0-oracles3-from2-only.json").read_text())
    assert set(added["models"]) == {"oracle-s2"}
    (record,) = json.loads((tmp_path / "oracle.json").read_text())["runs"]
    assert set(record["models"]) == {"original", "oracle", "oracle-s1", "oracle-s2", "service", "paper"}


def test_oracles_only_refuses_what_it_would_not_measure(capsys):
    for argv in (["--domain", "digits", "--oracles-only", "--variants", "every-block"],
                 ["--domain", "cifar", "--oracles-only"]):
        with pytest.raises(SystemExit):
            oracle.main(argv)
        assert "--oracles-only measures the oracles alone" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--first-oracle-seed", "1", "--oracle-seeds", "2"],  # not --oracles-only
                                  ["--first-oracle-seed", "2", "--oracle-seeds", "2", "--oracles-only"]])  # nothing left
def test_a_first_oracle_seed_needs_oracles_only_and_seeds_after_it(capsys, argv):
    with pytest.raises(SystemExit) as exited:
        oracle.main(["--domain", "cifar", *argv])
    assert exited.value.code == 2 and "--first-oracle-seed goes with --oracles-only" in capsys.readouterr().err


def test_a_variant_runs_models_join_the_first_runs_record():
    first = {"domain": "digits", "class": "3", "seed": 0, "models": {"original": {"a": 1}, "service": {"a": 2}}}
    variant = {"domain": "digits", "class": "3", "seed": 0, "models": {"original": {"a": 9}, "every-block": {"a": 3}}}
    (merged,) = oracle.merged([first, variant])
    assert merged["models"] == {"original": {"a": 1}, "service": {"a": 2}, "every-block": {"a": 3}}


def _model(probe: float, mia: float, interval: tuple[float, float]) -> dict:
    return {"acc_f": 0.0, "acc_r": 95.0, "probe": probe, "mia": mia, "mia_interval": list(interval),
            "relearn": 0.0, "mia_images_per_side": 36}


def test_gaps_are_to_the_oracles_mean_and_the_mia_target_is_the_hull_of_their_intervals():
    record = {"domain": "digits", "class": "3", "seed": 0, "models": {
        "original": _model(95.0, 50.0, (40, 60)), "oracle": _model(70.0, 40.0, (30, 50)),
        "oracle-s1": _model(80.0, 60.0, (50, 70)), "service": _model(80.0, 65.0, (55, 75)),
        "paper": _model(75.0, 72.0, (60, 80))}}
    rows = {r["model"]: r for r in oracle.summarise([record])}
    assert rows["service"]["oracles"] == 2
    assert rows["service"]["probe_gap"] == 5.0  # 80 against the mean of 70 and 80
    assert rows["oracle"]["probe_gap"] == -5.0 and rows["oracle-s1"]["probe_gap"] == 5.0  # retrainings' own spread
    # 65 is outside seed 0's interval but inside seed 1's: inside the band [30, 70]; 72 is outside it
    assert rows["service"]["mia_within_oracle_interval"] == "1/1"
    assert rows["paper"]["mia_within_oracle_interval"] == "0/1"
    assert (rows["service"]["mia_above_oracle_band"], rows["paper"]["mia_above_oracle_band"]) == ("0/1", "1/1")


def test_a_model_below_the_band_is_outside_it_but_not_above_it():
    record = {"domain": "digits", "class": "3", "seed": 0, "models": {
        "oracle": _model(70.0, 50.0, (40, 60)), "service": _model(70.0, 35.0, (25, 45))}}
    (row,) = [r for r in oracle.summarise([record]) if r["model"] == "service"]
    assert (row["mia_within_oracle_interval"], row["mia_above_oracle_band"]) == ("0/1", "0/1")


def test_runs_on_different_originals_are_different_runs():
    # --original-seed: the same class and run seed on another original is another draw, not a variant to merge
    runs = [{"domain": "digits", "class": "3", "seed": 0, "models": {"service": {"a": 1}}},
            {"domain": "digits", "class": "3", "seed": 0, "original_seed": 1, "models": {"service": {"a": 2}}}]
    assert [m["models"]["service"]["a"] for m in oracle.merged(runs)] == [1, 2]


def test_the_cifar_original_has_no_training_seed(capsys):
    with pytest.raises(SystemExit):
        oracle.main(["--domain", "cifar", "--original-seed", "1"])
    assert "--original-seed" in capsys.readouterr().err


def test_one_oracle_is_its_own_reference():
    record = {"domain": "digits", "class": "3", "seed": 0, "models": {
        "oracle": _model(70.0, 40.0, (30, 50)), "service": _model(80.0, 45.0, (35, 55))}}
    found = oracle.reference(record)
    assert (found["oracles"], found["probe"], found["mia"], found["mia_band"]) == (1, 70.0, 40.0, (30, 50))


def test_a_record_without_oracles_has_figures_but_no_gaps():
    # CIFAR-10 measured without its oracle (76 minutes to train on 2 cores): there is nothing to be a gap to
    record = {"domain": "cifar", "class": "airplane", "seed": 0, "models": {
        "original": _model(90.0, 55.0, (50, 60)), "service": _model(85.0, 52.0, (47, 57))}}
    rows = {r["model"]: r for r in oracle.summarise([record])}
    assert rows["service"]["probe"] == 85.0 and rows["service"]["probe_gap"] is None
    assert rows["service"]["oracles"] == 0 and rows["service"]["mia_within_oracle_interval"] == "0/0"
    assert "| cifar | service | 1 | 0 | 0.0 | 95.0 | 85.0 (–) |" in oracle.render(list(rows.values()), [record])


@pytest.mark.parametrize("domain, seeds", [("cifar", "-1"), ("digits", "0")])
def test_too_few_oracle_seeds_are_refused(capsys, domain, seeds):
    # cifar may go without an oracle (it takes 76 minutes to train on 2 cores, cifar_oracle.py); digits and faces may not
    with pytest.raises(SystemExit) as exited:
        oracle.main(["--domain", domain, "--oracle-seeds", seeds])
    assert exited.value.code == 2 and "--oracle-seeds must be at least" in capsys.readouterr().err


def test_a_digits_original_is_trained_from_its_own_seed_and_cached_apart(tmp_path, monkeypatch):
    monkeypatch.setenv("LETHE_BENCH_CACHE", str(tmp_path))
    seeds = []

    def train(data, out, *, epochs, seed):  # stands in for the 40-epoch training: the seed is what is checked
        seeds.append(seed)
        out.mkdir(parents=True)
        (out / "model.safetensors").touch()

    monkeypatch.setattr(oracle, "train_digits_vit", train)
    seeded = oracle.Digits(original_seed=2)
    assert (seeds, seeded.original.name, seeded.original_seed) == ([2], "digits-vit-s2", 2)
    assert oracle.Digits().original.name == "digits-vit" and seeds == [2, 0]
    assert oracle.Digits(original_seed=2).original == seeded.original and seeds == [2, 0]  # cached, not retrained


def test_a_cifar_forget_set_of_another_size_is_a_domain_of_its_own():
    assert oracle.cifar_domain(oracle.CIFAR_FORGET_IMAGES) == "cifar"
    few = oracle.cifar_domain(20)
    assert few == "cifar (20 images)"
    run = {"class": "automobile", "seed": 0, "original_seed": 0, "forget_images": 20,
           "models": {"service": {"acc_f": 0.0, "acc_r": 70.0, "probe": 60.0, "mia": 50.0, "mia_interval": None,
                                  "mia_images_per_side": 20, "relearn": 0.0}}}
    records = oracle.merged([{**run, "domain": "cifar", "forget_images": 500}, {**run, "domain": few}])
    assert len(records) == 2  # never merged into the many-image run of the same class and seed
    assert {r["domain"] for r in oracle.summarise(records)} == {"cifar", few}
