"""Losses and regularisers: small pure functions of tensors."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F


BOUNDED_LOSS_FLOOR = 1e-6  # below this mean CE, 1/CE is continued in log CE (see bounded_forget_loss)


def bounded_forget_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """1 / CE (paper eq. 8): minimising it raises CE on the forget set, and the loss stays in (0, inf).

    A model that is certain of its own training images can give a CE that underflows in fp32 (0, or
    below the floor): 1/CE would be infinite, and clamping CE there makes the gradient zero, so
    adapters starting at B = 0 would never move. Below ``BOUNDED_LOSS_FLOOR`` the loss is therefore
    continued by its tangent in log CE (the same value and slope at the floor), with log CE computed
    without underflow: its gradient stays of order one however saturated the model. At and above the
    floor it is exactly 1 / CE.

    logits: (N, K) float; labels: (N,) long. Returns a scalar.
    """
    ce = F.cross_entropy(logits, labels)
    floor = torch.tensor(BOUNDED_LOSS_FLOOR, dtype=logits.dtype, device=logits.device)
    below = (1.0 + floor.log() - log_mean_ce(logits, labels)) / floor
    return torch.where(ce >= floor, 1.0 / ce.clamp_min(floor), below)


def log_mean_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log(mean CE) without underflow. Per image CE = softplus(m), m = logsumexp of the other
    logits minus the true one; log softplus(m) is m itself once exp(m) is negligible next to 1."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf")).logsumexp(1)
    margin = others - true
    log_ce = torch.where(margin < -20, margin, F.softplus(margin.clamp_min(-20)).log())  # clamp: no NaN in the unused branch
    return log_ce.logsumexp(0) - torch.log(torch.tensor(float(len(log_ce)), device=logits.device))


def negative_ce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-CE (paper eq. 1), plain gradient ascent; unbounded below."""
    return -F.cross_entropy(logits, labels)


def random_labels_loss(logits: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """CE against a uniformly drawn wrong label for every image (paper eq. 2)."""
    num_classes = logits.shape[1]
    offsets = torch.randint(1, num_classes, labels.shape, generator=generator).to(labels.device)
    return F.cross_entropy(logits, (labels + offsets) % num_classes)


def masked_teacher(teacher_logits: torch.Tensor, forgotten: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The original model's softmax with the forgotten classes removed and the rest renormalised.

    teacher_logits: (N, K); forgotten: (F,) the class indices the run forgets, removed from every
    row (all of them: a target that moved one forgotten class's mass onto another would never be
    reached). ``temperature`` divides the logits first: below 1 the target sharpens toward the class
    the original ranks next. Returns (N, K) probabilities, 0 at every forgotten class: what a model
    never trained on them would likely say.
    """
    mask = torch.zeros(teacher_logits.shape[1], dtype=torch.bool, device=teacher_logits.device)
    mask[forgotten.to(teacher_logits.device)] = True
    return (teacher_logits.float() / temperature).masked_fill(mask, float("-inf")).softmax(dim=1)


def masked_kl_loss(logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """KL(teacher || model) towards ``masked_teacher`` (DELETE, CVPR 2025): a finite target, so
    unlike 1/CE it stops pushing once the forgotten class's probability mass has moved elsewhere.

    logits: (N, K); teacher_probs: (N, K). Returns a scalar (mean over images).
    """
    return F.kl_div(F.log_softmax(logits, dim=1), teacher_probs, reduction="batchmean")


def adversarial_neighbours(model: torch.nn.Module, images: torch.Tensor, towards: torch.Tensor, std: torch.Tensor,
                           *, eps: float = 8 / 255, steps: int = 5) -> torch.Tensor:
    """Targeted PGD (L-inf, in pixel units): images moved toward the class ``towards`` on ``model``.

    images: (N, C, H, W) normalised inputs; towards: (N,) class per image; std: (C,) the card's
    std, so that ``eps`` is a pixel-space radius. Returns (N, C, H, W) normalised inputs within
    eps of ``images`` (not clamped to the valid pixel range: they probe the boundary, not the data).
    The caller puts ``model`` in eval mode and wants no gradients on its weights.
    """
    radius = (eps / std).view(1, -1, 1, 1).to(images.device)
    stride = radius * 2.5 / steps  # the usual PGD step: each step can cross 40% of the ball
    moved = images.clone()
    for _ in range(steps):
        moved.requires_grad_(True)
        loss = F.cross_entropy(model(moved).float(), towards)
        (grad,) = torch.autograd.grad(loss, moved)
        with torch.no_grad():
            moved = moved - stride * grad.sign()  # descend: toward the target class
            moved = images + (moved - images).clamp(-radius, radius)
    return moved.detach()


def l1_norm(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """sum_i ||vec(t_i)||_1, e.g. over the LoRA B matrices (paper eq. 5)."""
    return torch.stack([t.abs().sum() for t in tensors]).sum()


def l1_distance(params: Iterable[torch.Tensor], initial: Iterable[torch.Tensor]) -> torch.Tensor:
    """||theta - theta0||_1 over matching tensors."""
    return torch.stack([(p - p0).abs().sum() for p, p0 in zip(params, initial, strict=True)]).sum()


def feature_match_loss(features: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of each image's pre-logit feature to its target feature, over ``scale``
    (the same distance for the original model: the term starts at 1 whatever the features' size).

    features, targets: (N, D) float; scale: a positive scalar. Returns a scalar.
    """
    return (features.float() - targets).pow(2).sum(1).mean() / scale


def class_direction(features: torch.Tensor, of_class: torch.Tensor, others: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(direction, level, gap): the unit vector from the mean feature of the rows ``others`` to that
    of the rows ``of_class``, the others' mean component along it, and the squared distance between
    the two means. With the class's mean at the others' (gap 0), no linear one-against-the-rest
    predictor does better than a constant on these rows under a convex loss (LEACE, Belrose et al. 2023);
    a multi-class probe can still find a class that sits between the others.

    features: (N, D) float; of_class, others: (N,) bool. Returns (D,), a scalar and a scalar.
    """
    difference = features[of_class].mean(0) - features[others].mean(0)
    gap = difference.pow(2).sum()
    direction = difference / gap.sqrt().clamp_min(1e-12)
    return direction, features[others].mean(0) @ direction, gap


def direction_erasure_loss(features: torch.Tensor, direction: torch.Tensor, level: torch.Tensor,
                           scale: torch.Tensor) -> torch.Tensor:
    """Mean squared component of each row along ``direction`` about ``level``, over ``scale``: 0 when
    every image, of the class and of the others, sits at one value along it, where a probe finds
    nothing (moving the class's images alone to the level puts them between the others, and a
    multi-class probe still finds them there: benchmarks/probe_direction.py).

    features: (N, D) float; direction: (D,) unit; level, scale: scalars. Returns a scalar.
    """
    return (features.float() @ direction - level).pow(2).mean() / scale


def invert_classes(model: torch.nn.Module, classes: torch.Tensor, shape: tuple[int, ...], low: torch.Tensor,
                   high: torch.Tensor, generator: torch.Generator, *, steps: int = 200, lr: float = 0.05,
                   tv_weight: float = 0.05, l2_weight: float = 1e-3) -> torch.Tensor:
    """Model inversion: one synthetic input per entry of ``classes``, from uniform noise, optimised by
    Adam to minimise the model's CE toward it plus a total-variation and an L2 prior, kept within the
    valid input range [low, high] (normalised units, (C,) each). ``classes``: (N,) class indices, or
    (N, K) class probabilities (an input the model should find that uncertain: a boundary).

    shape: (C, H, W). Returns (N, C, H, W) normalised inputs. The caller puts ``model`` in eval mode
    and wants no gradients on its weights.
    """
    low, high = low.view(1, -1, 1, 1).to(classes.device), high.view(1, -1, 1, 1).to(classes.device)
    x = (low + (high - low) * torch.rand((len(classes), *shape), generator=generator).to(classes.device))
    x.requires_grad_(True)
    optimiser = torch.optim.Adam([x], lr=lr)
    for _ in range(steps):
        tv = (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
        loss = F.cross_entropy(model(x).float(), classes) + tv_weight * tv + l2_weight * x.pow(2).mean()
        (x.grad,) = torch.autograd.grad(loss, x)  # on the inputs only: the model's weights get no gradient
        optimiser.step()
        with torch.no_grad():
            x.copy_(torch.maximum(torch.minimum(x, high), low))
    return x.detach()
