"""The classifier's rows of forgotten classes, reset to what a class nobody trained looks like.

A forgotten class's row of the head (its weight vector and bias) is a learned template of the
class: on the digits ViT its cosine with the class's mean feature (over the others') is 0.99, and in
a face model it is the person's template. Adapters on the attention leave it in the published
weights word for word, and it is what ten fine-tuning steps use to give the class back
(benchmarks/README.md, the oracle table). A model retrained without the class has a row that was
never a target: on the digits its logit sits near the mean of the other classes' on every input,
the class's images as much as any (0.4-0.8 below it, three retrainings of digit 3). Setting the
row to the mean of the kept classes' rows puts it at that mean exactly, from the model alone, and
keeps nothing of the class.

It changes the class's logit and nothing else, so every kept class keeps each prediction the
network made between kept classes: accuracy on the kept classes can only rise (images the network
put in the forgotten class go to their best kept one). It cannot take the class out of the features:
that is the adapters' work, judged before the reset (the forget-set target) and by the probe after.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from worker.engine.errors import ConfigError, UnsupportedModelError


def classifier(model: torch.nn.Module) -> torch.nn.Linear:
    """The model's final linear layer, one row per class (timm's ``get_classifier()``)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, torch.nn.Linear):
        raise UnsupportedModelError(f"{type(model).__name__} has no linear classifier head to reset rows of")
    return head


def rows_to_reset(classes: int, forgotten: Iterable[int]) -> tuple[int, ...]:
    """The rows ``reset_class_rows`` sets, refused when fewer than two classes would be kept: one kept
    row would equal the reset ones, a tie on every input that argmax breaks by index, so a forgotten
    class could be predicted everywhere."""
    rows = tuple(sorted(set(forgotten)))
    if classes - len(rows) < 2:
        raise ConfigError(f"reset_head_rows needs at least two classes kept; {classes - len(rows)} would be left "
                          "(leave the head rows as trained for this model)")
    return rows


@torch.no_grad()
def reset_class_rows(model: torch.nn.Module, forgotten: Iterable[int]) -> None:
    """Set each forgotten class's head row (weight and bias) to the mean of the rows of the classes
    not forgotten, in place. Rows of classes forgotten earlier belong in ``forgotten`` too: a mean
    taken over them would carry a share of their old templates into the new row.

    Args:
        model: a timm classifier.
        forgotten: indices of every class forgotten, by this run and earlier ones.
    """
    head = classifier(model)
    gone = torch.zeros(head.weight.shape[0], dtype=torch.bool, device=head.weight.device)
    gone[torch.tensor(rows_to_reset(head.weight.shape[0], forgotten), dtype=torch.long, device=gone.device)] = True
    kept_mean = head.weight[~gone].float().mean(0)
    head.weight[gone] = kept_mean.to(head.weight.dtype)
    if head.bias is not None:
        head.bias[gone] = head.bias[~gone].float().mean().to(head.bias.dtype)


def row_prototypes(rows: torch.Tensor, classes: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """Stand-ins for classes' mean features taken from the head alone: the row of each entry of
    ``classes`` (N,), scaled to the matching entry of ``norms`` (N,). rows: (K, D). Returns (N, D).
    As good as the rows are templates of their classes (the feature term's ``feature_prototypes="head"``)."""
    return torch.nn.functional.normalize(rows[classes].float(), dim=1) * norms.float()[:, None]


def row_cosines(rows: torch.Tensor, classes: tuple[int, ...], features: list[torch.Tensor]) -> list[float]:
    """How far each class's head row is its template: the cosine of row ``classes[i]`` of ``rows`` (K, D)
    with the mean of ``features[i]`` (N_i, D), the model's features of that class's images."""
    return [round(torch.nn.functional.cosine_similarity(rows[c].float().cpu(), f.float().cpu().mean(0), dim=0).item(), 4)
            for c, f in zip(classes, features)]
