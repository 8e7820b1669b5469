"""The unlearning methods behind one interface: what is trained, and which loss it minimises.

The product's method is ``lora-bounded`` (Poppi et al., ICPR 2024, eq. 8). The others are the
paper's baselines and ablations (its Table 1), kept for the benchmarks; ``lora-kl`` is a
retain-free candidate of ours (same adapters, a finite-target loss), and ``lora-adv`` adds to it
the same term on adversarial neighbours of the forget images; the benchmarks judge them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

from worker.engine.adapters import lora_b_matrices
from worker.engine.losses import bounded_forget_loss, l1_distance, l1_norm, masked_kl_loss, negative_ce_loss, random_labels_loss


# --- the forget term: what each forget set's logits are pushed toward ---------------------------

class ForgetObjective(ABC):
    """The per-class term on a batch of one forget set's logits."""

    name: str
    needs_teacher = False  # wants the original's masked softmax on the batch (computed by the loop)

    @abstractmethod
    def loss(self, logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None,
             generator: torch.Generator) -> torch.Tensor: ...

    def __repr__(self) -> str:
        return self.name


class Bounded(ForgetObjective):
    """1 / CE (the paper's eq. 8)."""

    name = "bounded"

    def loss(self, logits, labels, teacher, generator):
        return bounded_forget_loss(logits, labels)


class Negative(ForgetObjective):
    """-CE: plain gradient ascent (eq. 1)."""

    name = "negative"

    def loss(self, logits, labels, teacher, generator):
        return negative_ce_loss(logits, labels)


class MaskedKL(ForgetObjective):
    """KL to the original's softmax with the forgotten class removed: a finite target."""

    name, needs_teacher = "masked-kl", True

    def loss(self, logits, labels, teacher, generator):
        return masked_kl_loss(logits, teacher)


class RandomLabels(ForgetObjective):
    """CE toward random wrong labels."""

    name = "random-labels"

    def loss(self, logits, labels, teacher, generator):
        return random_labels_loss(logits, labels, generator)


# --- the regulariser: lambda-weighted, on what is trained ----------------------------------------

class Regulariser(ABC):
    name: str
    needs_adapters: bool  # only meaningful when LoRA adapters are what is trained

    @abstractmethod
    def bind(self, model: torch.nn.Module, trainable: list[torch.Tensor]) -> Callable[[], torch.Tensor]:
        """The penalty for this model, as it is about to be trained (before any step)."""

    def __repr__(self) -> str:
        return self.name


class LoraL1(Regulariser):
    """sum |B| over the LoRA B matrices (eq. 5): sparse, low-magnitude updates."""

    name, needs_adapters = "lora-l1", True

    def bind(self, model, trainable):
        b_matrices = lora_b_matrices(model)
        return lambda: l1_norm(b_matrices)


class WeightL1(Regulariser):
    """|theta - theta0|_1 over every trained weight."""

    name, needs_adapters = "weight-l1", False

    def bind(self, model, trainable):
        initial = [p.detach().clone() for p in trainable]
        return lambda: l1_distance(trainable, initial)


@dataclass(frozen=True)
class Method:
    name: str
    adapters: bool  # True: train LoRA adapters only; False: train every weight
    forget: ForgetObjective | None  # the per-class term on the forget set (None: retain data only)
    regulariser: Regulariser | None
    uses_retain: bool  # adds cross-entropy on a labelled retain source
    default_lr: float  # the paper's learning rate for this family
    summary: str
    neighbours: bool = False  # also hold the original's (masked) softmax on adversarial neighbours

    def __post_init__(self) -> None:
        """A method is checked when it is defined, not when a run first reaches the mismatch."""
        if self.regulariser is not None and self.regulariser.needs_adapters and not self.adapters:
            raise ValueError(f"{self.name}: {self.regulariser} regularises LoRA adapters, and this method has none")
        if self.forget is None and not self.uses_retain:
            raise ValueError(f"{self.name}: trains on nothing (no forget term, no retain data)")
        if self.neighbours and not (self.forget is not None and self.forget.needs_teacher):
            raise ValueError(f"{self.name}: adversarial neighbours are held by the original's softmax: "
                             "they need a teacher-based forget term")
        if self.default_lr <= 0:
            raise ValueError(f"{self.name}: default_lr must be positive")


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("lora-bounded", True, Bounded(), LoraL1(), False, 1e-2,
               "LoRA on the target layers; 1/CE(forget) + lambda*sum|B| (the paper's method)"),
        Method("lora-kl", True, MaskedKL(), LoraL1(), False, 3e-3,
               "LoRA on the target layers; KL to the original softmax without the class + lambda*sum|B|"),
        Method("lora-adv", True, MaskedKL(), LoraL1(), False, 3e-3,
               "lora-kl, plus the same KL on adversarial neighbours of the forget images (PGD toward other classes)",
               neighbours=True),
        Method("ng-lora", True, Negative(), LoraL1(), False, 1e-2,
               "LoRA on the target layers; -CE(forget) + lambda*sum|B|"),
        Method("ng-l1", False, Negative(), WeightL1(), False, 5e-5,
               "all weights; -CE(forget) + lambda*|theta - theta0|_1"),
        Method("bounded-l1", False, Bounded(), WeightL1(), False, 5e-5,
               "all weights; 1/CE(forget) + lambda*|theta - theta0|_1"),
        Method("ng-retain", False, Negative(), None, True, 1e-4,
               "all weights; -CE(forget) + CE(retain)"),
        Method("random-labels", False, RandomLabels(), None, True, 1e-4,
               "all weights; CE(forget, random wrong labels) + CE(retain)"),
        Method("finetune", False, None, None, True, 1e-4,
               "all weights; CE(retain) only"),
    )
}
