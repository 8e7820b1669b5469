"""benchmarks/probe_direction.py: the feature edits it measures, on features where the answer is known
(the run itself needs ../shared's CIFAR-10 and the reference model: a benchmark, not a test)."""

from __future__ import annotations

import torch

from benchmarks import probe_direction
from worker.engine.evidence import probe_on_features


def three_classes_on_a_line(n: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Classes 0, 1, 2 centred at +3, -3 and 0 along the first of 4 features, alike in the rest."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat_interleave(n)
    x = 0.5 * torch.randn(3 * n, 4, generator=generator)
    x[:, 0] += torch.tensor([3.0, -3.0, 0.0])[labels]
    return x, labels


def probe(x: torch.Tensor, labels: torch.Tensor) -> float:
    return probe_on_features(x, labels, 0, seed=0).accuracy


def test_the_class_direction_points_from_the_others_mean_to_the_class():
    x, labels = three_classes_on_a_line()
    direction = probe_direction.class_direction(x, labels, 0)
    assert abs(direction.norm().item() - 1.0) < 1e-6
    assert direction[0] > 0.99


def test_erasing_the_direction_leaves_the_probe_nothing_but_moving_the_class_alone_does_not():
    x, labels = three_classes_on_a_line()
    direction = probe_direction.class_direction(x, labels, 0)
    level = x[labels != 0].mean(0)
    assert probe(x, labels) > 95
    # Every image's component set to one value: the three classes are alike, a probe guesses.
    assert probe(probe_direction.scaled_along(x, direction, level, 0.0), labels) < 50
    # Halving every component is an invertible linear change of the features, which a linear probe undoes.
    assert probe(probe_direction.scaled_along(x, direction, level, 0.5), labels) > 95
    # The class alone moved to the others' mean lands between them: still a class of its own.
    offset = ((x[labels == 0].mean(0) - level) @ direction).item()
    moved = probe_direction.moved(x, labels == 0, direction, torch.tensor(-offset))
    assert abs(((moved[labels == 0].mean(0) - level) @ direction).item()) < 1e-4
    assert probe(moved, labels) > 80


def test_the_edits_take_the_direction_from_the_held_out_images_not_the_scored_ones():
    # Held out, class 0 stands apart along feature 0; in the scored images, along feature 1 as well.
    held, held_labels = three_classes_on_a_line()
    x, labels = three_classes_on_a_line()
    x[:, 1] += torch.tensor([3.0, -3.0, 0.0])[labels]
    edited = dict(probe_direction.edits(x, labels, held, held_labels, 0))
    # Only feature 0's direction is erased: feature 1 still gives the class away.
    assert probe(edited["direction erased"], labels) > 95
    assert [name for name in edited] == ["none", "direction erased", "class alone moved to the others' level",
                                         "every component halved"]


def test_kept_accuracy_scores_the_other_classes_with_the_class_logit_left_out():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 2])
    weight = torch.tensor([[0.0, 9.0], [0.0, 1.0], [1.0, 0.0]])  # class 0 would win every image of class 1
    bias = torch.zeros(3)
    # Class 1's image is read as class 1 once class 0's logit is left out; class 2's as class 1 (wrong).
    assert probe_direction.kept_accuracy(x, labels, 0, weight, bias) == 50.0


def test_missing_data_is_one_line_and_exit_2(tmp_path, capsys):
    out = tmp_path / "out.json"
    assert probe_direction.main(["--cifar-model", str(tmp_path / "none"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("probe_direction: ") and err.count("\n") == 1
    assert not out.exists()
