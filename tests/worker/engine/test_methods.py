"""The methods are typed objects that check themselves when they are defined."""

from __future__ import annotations

import pytest
import torch

from worker.engine.methods import METHODS, Bounded, LoraL1, MaskedKL, Method, Negative, WeightL1


def method(**changes) -> Method:
    fields = dict(name="m", adapters=True, forget=MaskedKL(), regulariser=LoraL1(), uses_retain=False,
                  default_lr=1e-3, summary="")
    return Method(**{**fields, **changes})


@pytest.mark.parametrize(("changes", "message"), [
    ({"adapters": False}, "regularises LoRA adapters, and this method has none"),
    ({"forget": None}, "trains on nothing"),
    ({"forget": Bounded(), "neighbours": True}, "need a teacher-based forget term"),
    ({"default_lr": 0.0}, "default_lr must be positive"),
])
def test_an_inconsistent_method_is_refused_when_it_is_defined(changes, message):
    with pytest.raises(ValueError, match=message):
        method(**changes)


def test_every_shipped_method_is_consistent_and_retain_free_ones_have_a_forget_term():
    for m in METHODS.values():
        assert m.uses_retain or m.forget is not None, m.name
    assert [m for m in METHODS.values() if not m.uses_retain and m.regulariser is None] == []


def test_the_weight_regulariser_measures_the_distance_from_the_weights_it_was_bound_to():
    weight = torch.nn.Parameter(torch.ones(3))
    penalty = WeightL1().bind(torch.nn.Module(), [weight])
    assert penalty().item() == 0.0
    with torch.no_grad():
        weight.add_(torch.tensor([1.0, -2.0, 0.0]))
    assert penalty().item() == 3.0


def test_a_forget_objective_gets_the_teacher_only_when_it_needs_one():
    logits, labels = torch.tensor([[3.0, 0.0]]), torch.tensor([0])
    assert torch.allclose(Negative().loss(logits, labels, None, torch.Generator()),
                          -torch.nn.functional.cross_entropy(logits, labels))
    assert MaskedKL.needs_teacher and not Bounded.needs_teacher
