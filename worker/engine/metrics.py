"""Accuracy metrics, as percentages: small pure functions of predictions and labels."""

from __future__ import annotations

from collections.abc import Callable

import torch

from worker.engine.images import normalise
from worker.engine.package import InputSpec
from worker.engine.runtime import Runtime


@torch.no_grad()
def eval_logits(model: torch.nn.Module, images: torch.Tensor, runtime: Runtime, batch_size: int,
                spec: InputSpec | None = None,
                each: Callable[[torch.Tensor], torch.Tensor] = lambda logits: logits) -> torch.Tensor:
    """The model's fp32 logits in eval mode, batch by batch, each batch mapped by ``each``: (N, C, H, W) -> (N, ...).

    With ``spec``, ``images`` are uint8 pixels normalised batch by batch; without, they are
    already the model's input (as the forget sets are, prepared once for training).
    """
    was_training = model.training
    model.eval()
    outputs = []
    for start in range(0, images.shape[0], batch_size):
        batch = images[start:start + batch_size].to(runtime.device)
        if spec is not None:
            batch = normalise(batch, spec)
        with runtime.autocast():
            outputs.append(each(model(batch).float()))
    model.train(was_training)
    return torch.cat(outputs)


def predict(model: torch.nn.Module, images: torch.Tensor, runtime: Runtime, batch_size: int,
            spec: InputSpec | None = None) -> torch.Tensor:
    """Predicted class of each image, in eval mode: (N, C, H, W) -> (N,) long on the CPU."""
    return eval_logits(model, images, runtime, batch_size, spec, each=lambda logits: logits.argmax(dim=1).cpu())


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Percentage of correct predictions; 0 for no images. (N,), (N,) -> float."""
    if labels.numel() == 0:
        return 0.0
    return (predictions == labels).float().mean().item() * 100.0


def per_class_accuracy(predictions: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...]) -> dict[str, float | None]:
    """Accuracy of each class's images; None for a class without images in the set."""
    return {
        name: (accuracy(predictions[labels == i], labels[labels == i]) if (labels == i).any() else None)
        for i, name in enumerate(classes)
    }


def forget_retain_accuracy(predictions: torch.Tensor, labels: torch.Tensor, forgotten: list[int]) -> tuple[float, float]:
    """(Acc_f, Acc_r): accuracy pooled over the forgotten classes' images, and over all the others."""
    is_forgotten = torch.isin(labels, torch.tensor(forgotten, dtype=labels.dtype))
    return (accuracy(predictions[is_forgotten], labels[is_forgotten]),
            accuracy(predictions[~is_forgotten], labels[~is_forgotten]))


def selection_score(acc_r: float, acc_f: float) -> float:
    """The paper's early-stopping score: the mean of Acc_r and 100 - Acc_f."""
    return (acc_r + (100.0 - acc_f)) / 2.0
