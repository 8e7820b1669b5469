"""Losses as pure functions: bounded, masked-KL and its teacher, adversarial neighbours."""

from __future__ import annotations

import pytest
import torch

from worker.engine.losses import adversarial_neighbours, bounded_forget_loss, log_mean_ce, masked_kl_loss, masked_teacher


def test_the_masked_teacher_moves_the_forgotten_class_mass_to_the_others_in_proportion():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    probs = masked_teacher(logits, torch.tensor([0]))
    assert (probs[:, 0] == 0).all()
    assert torch.allclose(probs.sum(1), torch.ones(2))
    assert torch.allclose(probs[0, 1] / probs[0, 2], torch.tensor(1.0).exp())  # ratios of the rest kept


def test_the_masked_teacher_removes_every_class_the_run_forgets_from_every_image():
    probs = masked_teacher(torch.tensor([[2.0, 1.0, 0.0, 1.0], [0.0, 3.0, 1.0, 0.0]]), torch.tensor([0, 1]))
    assert (probs[:, :2] == 0).all() and torch.allclose(probs.sum(1), torch.ones(2))


def test_masked_kl_is_zero_at_its_target_and_positive_elsewhere():
    teacher = masked_teacher(torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([0]))
    reached = torch.tensor([[-30.0, 1.0, 0.0]])  # the forgotten class all but gone, the rest as before
    assert masked_kl_loss(reached, teacher) < 1e-6
    assert masked_kl_loss(torch.tensor([[2.0, 1.0, 0.0]]), teacher) > 0.5
    assert torch.isfinite(masked_kl_loss(torch.tensor([[90.0, -90.0, 0.0]]), teacher))


def test_the_bounded_loss_stays_finite_on_a_perfectly_confident_model():
    loss = bounded_forget_loss(torch.tensor([[200.0, -200.0]]), torch.tensor([0]))
    assert torch.isfinite(loss)


@pytest.mark.parametrize("margin", [30.0, 80.0, 200.0])  # CE ~1e-13, ~1e-35, exactly 0 in fp32
def test_the_bounded_loss_still_pushes_a_model_certain_of_its_forget_images(margin):
    logits = torch.tensor([[margin, 0.0, 0.0], [margin / 2, 0.0, 1.0]], requires_grad=True)
    loss = bounded_forget_loss(logits, torch.tensor([0, 0]))
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert grad[:, 0].max() > 1e-3  # descending lowers the true class's logit: the loss does not stall
    assert (grad[:, 1:] < 0).any()


def test_the_bounded_loss_is_one_over_ce_wherever_ce_is_above_its_floor():
    torch.manual_seed(0)
    logits, labels = torch.randn(8, 5) * 3, torch.randint(0, 5, (8,))
    assert torch.allclose(bounded_forget_loss(logits, labels), 1 / torch.nn.functional.cross_entropy(logits, labels))
    assert torch.allclose(log_mean_ce(logits, labels), torch.nn.functional.cross_entropy(logits, labels).log())


def test_adversarial_neighbours_stay_within_eps_in_pixels_and_move_toward_the_target_class():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3)).eval()
    images = torch.randn(16, 3, 4, 4)
    std = torch.tensor([0.25, 0.5, 1.0])
    towards = torch.full((16,), 2)
    moved = adversarial_neighbours(model, images, towards, std, eps=8 / 255, steps=5)
    pixel_shift = ((moved - images) * std.view(1, -1, 1, 1)).abs()
    assert pixel_shift.max() <= 8 / 255 + 1e-6 and pixel_shift.max() > 4 / 255
    before = torch.log_softmax(model(images), 1)[:, 2]
    after = torch.log_softmax(model(moved), 1)[:, 2]
    assert (after > before).all()
    assert not any(p.grad is not None for p in model.parameters())  # the model's weights are left alone


def test_feature_match_loss_is_one_at_the_start_and_zero_on_target():
    from worker.engine.losses import feature_match_loss

    start, target = torch.randn(5, 8), torch.randn(5, 8)
    scale = (start - target).pow(2).sum(1).mean()
    assert torch.isclose(feature_match_loss(start, target, scale), torch.tensor(1.0))
    assert feature_match_loss(target, target, scale).item() == 0.0


def test_invert_classes_stays_in_range_and_leaves_weights_without_gradients():
    from worker.engine.losses import invert_classes

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x = invert_classes(model, torch.tensor([0, 1, 2]), (1, 4, 4), torch.tensor([-1.0]), torch.tensor([2.0]),
                       torch.Generator().manual_seed(0), steps=20)
    assert x.shape == (3, 1, 4, 4) and x.min() >= -1.0 and x.max() <= 2.0
    assert all(p.grad is None for p in model.parameters())
    assert (model(x).argmax(1) == torch.tensor([0, 1, 2])).all()


def test_invert_classes_toward_an_even_mix_finds_an_input_on_the_boundary():
    from worker.engine.losses import invert_classes

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    mix = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]])
    x = invert_classes(model, mix, (1, 4, 4), torch.tensor([-1.0]), torch.tensor([2.0]),
                       torch.Generator().manual_seed(0), steps=200)
    found = model(x).softmax(1)
    assert ((found - mix).abs() < 0.1).all(), found


def test_feature_weight_needs_a_teacher_method():
    import pytest

    from worker.engine.config import UnlearnConfig
    from worker.engine.errors import ConfigError

    assert UnlearnConfig().feature_weight == 0.0  # off by default
    UnlearnConfig(method="lora-kl", feature_weight=1.0)
    with pytest.raises(ConfigError):
        UnlearnConfig(method="lora-bounded", feature_weight=1.0)
    with pytest.raises(ConfigError):
        UnlearnConfig(method="lora-kl", feature_weight=1.0, feature_tol=0.0)
    for weight in (-1.0, float("inf"), 1e4):
        with pytest.raises(ConfigError, match="anchor_feature_weight"):
            UnlearnConfig(method="lora-kl", anchor_feature_weight=weight)


def test_a_cooler_masked_teacher_sharpens_toward_the_class_ranked_next_and_keeps_the_forgotten_at_zero():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    plain, sharp = (masked_teacher(logits, torch.tensor([0]), t) for t in (1.0, 0.1))
    assert torch.equal(plain, masked_teacher(logits, torch.tensor([0])))  # 1 is the original's own distribution
    assert sharp[0, 0] == 0 and sharp[0, 1] > 0.99 > plain[0, 1]
    assert sharp.argmax(1) == plain.argmax(1)


def test_target_temperature_and_feature_prototypes_are_refused_where_they_could_not_act():
    from worker.engine.config import UnlearnConfig
    from worker.engine.errors import ConfigError

    UnlearnConfig(method="lora-kl", target_temperature=0.1)
    UnlearnConfig(method="lora-kl", feature_weight=1.0, feature_prototypes="head")
    for bad, match in (({"method": "lora-kl", "target_temperature": 0.001}, "target_temperature must be"),
                       ({"method": "lora-kl", "target_temperature": float("nan")}, "target_temperature must be"),
                       ({"method": "lora-bounded", "target_temperature": 0.5}, "needs lora-kl or lora-adv"),
                       ({"method": "lora-kl", "feature_weight": 1.0, "feature_prototypes": "rows"}, "one of"),
                       ({"method": "lora-kl", "feature_prototypes": "head"}, "set feature_weight too"),
                       ({"method": "lora-kl", "head_template_cosine": 1.5}, "head_template_cosine must be")):
        with pytest.raises(ConfigError, match=match):
            UnlearnConfig(**bad)


def test_the_class_direction_points_from_the_others_mean_to_the_class_s():
    from worker.engine.losses import class_direction

    features = torch.tensor([[3.0, 1.0], [5.0, 1.0], [0.0, 0.0], [0.0, 2.0], [9.0, 9.0]])
    of_class = torch.tensor([True, True, False, False, False])
    others = torch.tensor([False, False, True, True, False])  # the last row is of neither (another forgotten class)
    direction, level, gap = class_direction(features, of_class, others)
    assert torch.allclose(direction, torch.tensor([1.0, 0.0]))  # (4, 1) - (0, 1)
    assert level.item() == 0.0 and gap.item() == 16.0


def test_the_erasure_loss_is_zero_once_every_image_sits_at_the_level_and_blind_to_the_rest():
    from worker.engine.losses import direction_erasure_loss

    direction, level, scale = torch.tensor([1.0, 0.0]), torch.tensor(2.0), torch.tensor(4.0)
    apart = torch.tensor([[4.0, 0.0], [0.0, 0.0]])  # each 2 from the level along the direction
    assert direction_erasure_loss(apart, direction, level, scale).item() == 1.0
    erased = torch.tensor([[2.0, -7.0], [2.0, 3.0]])  # at the level; anything across the direction is left alone
    assert direction_erasure_loss(erased, direction, level, scale).item() == 0.0
