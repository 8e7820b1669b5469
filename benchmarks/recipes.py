"""What the benchmarks' training recipes share: the learning-rate schedule of the face model and of
the CIFAR-10 reference (and so of its oracles)."""

from __future__ import annotations

import math

import torch


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps``, then a cosine from the base rate down to 0 at ``total_steps``
    (per optimiser step; the two meet where the cosine falls below the ramp)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(
        (step + 1) / max(warmup_steps, 1), 0.5 * (1 + math.cos(math.pi * min(step / max(total_steps, 1), 1.0)))))
