"""Losses as pure functions: bounded, masked-KL and its teacher."""

from __future__ import annotations

import torch

from worker.engine.losses import bounded_forget_loss, masked_kl_loss, masked_teacher


def test_the_masked_teacher_moves_the_forgotten_class_mass_to_the_others_in_proportion():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    probs = masked_teacher(logits, torch.tensor([0, 1]))
    assert probs[0, 0] == 0 and probs[1, 1] == 0
    assert torch.allclose(probs.sum(1), torch.ones(2))
    assert torch.allclose(probs[0, 1] / probs[0, 2], torch.tensor(1.0).exp())  # ratios of the rest kept


def test_masked_kl_is_zero_at_its_target_and_positive_elsewhere():
    teacher = masked_teacher(torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([0]))
    reached = torch.tensor([[-30.0, 1.0, 0.0]])  # the forgotten class all but gone, the rest as before
    assert masked_kl_loss(reached, teacher) < 1e-6
    assert masked_kl_loss(torch.tensor([[2.0, 1.0, 0.0]]), teacher) > 0.5
    assert torch.isfinite(masked_kl_loss(torch.tensor([[90.0, -90.0, 0.0]]), teacher))


def test_the_bounded_loss_stays_finite_on_a_perfectly_confident_model():
    loss = bounded_forget_loss(torch.tensor([[200.0, -200.0]]), torch.tensor([0]))
    assert torch.isfinite(loss)
