"""Losses and regularisers: small pure functions of tensors."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F


def bounded_forget_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """1 / CE (paper eq. 8): minimising it raises CE on the forget set, but the loss stays in (0, inf).

    logits: (N, K) float; labels: (N,) long. Returns a scalar.
    """
    # A confident model can give CE == 0 in fp32 on its own training images; 1/0 would poison Adam.
    return 1.0 / F.cross_entropy(logits, labels).clamp_min(1e-6)


def negative_ce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-CE (paper eq. 1), plain gradient ascent; unbounded below."""
    return -F.cross_entropy(logits, labels)


def random_labels_loss(logits: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """CE against a uniformly drawn wrong label for every image (paper eq. 2)."""
    num_classes = logits.shape[1]
    offsets = torch.randint(1, num_classes, labels.shape, generator=generator).to(labels.device)
    return F.cross_entropy(logits, (labels + offsets) % num_classes)


def masked_teacher(teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The original model's softmax with the forgotten class removed and the rest renormalised.

    teacher_logits: (N, K); labels: (N,) the forgotten class of each image. Returns (N, K)
    probabilities, 0 at each image's label: what a model never trained on that class would likely say.
    """
    forgotten = F.one_hot(labels, teacher_logits.shape[1]).bool()
    return teacher_logits.float().masked_fill(forgotten, float("-inf")).softmax(dim=1)


def masked_kl_loss(logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """KL(teacher || model) towards ``masked_teacher`` (DELETE, CVPR 2025): a finite target, so
    unlike 1/CE it stops pushing once the forgotten class's probability mass has moved elsewhere.

    logits: (N, K); teacher_probs: (N, K). Returns a scalar (mean over images).
    """
    return F.kl_div(F.log_softmax(logits, dim=1), teacher_probs, reduction="batchmean")


def l1_norm(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """sum_i ||vec(t_i)||_1, e.g. over the LoRA B matrices (paper eq. 5)."""
    return torch.stack([t.abs().sum() for t in tensors]).sum()


def l1_distance(params: Iterable[torch.Tensor], initial: Iterable[torch.Tensor]) -> torch.Tensor:
    """||theta - theta0||_1 over matching tensors."""
    return torch.stack([(p - p0).abs().sum() for p, p0 in zip(params, initial, strict=True)]).sum()
