"""The unlearning methods behind one interface: what is trained, and which loss it minimises.

The product's method is ``lora-bounded`` (Poppi et al., ICPR 2024, eq. 8). The others are the
paper's baselines and ablations (its Table 1), kept for the benchmarks; ``lora-kl`` is a
retain-free candidate of ours (same adapters, a finite-target loss), and ``lora-adv`` adds to it
the same term on adversarial neighbours of the forget images; the benchmarks judge them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ForgetObjective = Literal["bounded", "negative", "masked-kl", "random-labels", "none"]
Regulariser = Literal["lora-l1", "weight-l1", "none"]


@dataclass(frozen=True)
class Method:
    name: str
    adapters: bool  # True: train LoRA adapters only; False: train every weight
    forget_objective: ForgetObjective  # the per-class term on the forget set
    regulariser: Regulariser  # lambda-weighted: L1 of the LoRA B matrices, or of theta - theta0
    uses_retain: bool  # adds cross-entropy on a labelled retain source
    default_lr: float  # the paper's learning rate for this family
    summary: str
    neighbours: bool = False  # also hold the original's (masked) softmax on adversarial neighbours


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("lora-bounded", True, "bounded", "lora-l1", False, 1e-2,
               "LoRA on the target layers; 1/CE(forget) + lambda*sum|B| (the paper's method)"),
        Method("lora-kl", True, "masked-kl", "lora-l1", False, 3e-3,
               "LoRA on the target layers; KL to the original softmax without the class + lambda*sum|B|"),
        Method("lora-adv", True, "masked-kl", "lora-l1", False, 3e-3,
               "lora-kl, plus the same KL on adversarial neighbours of the forget images (PGD toward other classes)",
               neighbours=True),
        Method("ng-lora", True, "negative", "lora-l1", False, 1e-2,
               "LoRA on the target layers; -CE(forget) + lambda*sum|B|"),
        Method("ng-l1", False, "negative", "weight-l1", False, 5e-5,
               "all weights; -CE(forget) + lambda*|theta - theta0|_1"),
        Method("bounded-l1", False, "bounded", "weight-l1", False, 5e-5,
               "all weights; 1/CE(forget) + lambda*|theta - theta0|_1"),
        Method("ng-retain", False, "negative", "none", True, 1e-4,
               "all weights; -CE(forget) + CE(retain)"),
        Method("random-labels", False, "random-labels", "none", True, 1e-4,
               "all weights; CE(forget, random wrong labels) + CE(retain)"),
        Method("finetune", False, "none", "none", True, 1e-4,
               "all weights; CE(retain) only"),
    )
}
