"""Two independent halves of an evaluation set: the selection half chooses the checkpoint, the audit
half judges it (the publish gate and every evidence figure). Measured on the images that chose it,
a checkpoint looks better than it is.

The split is a function of the images themselves, not of file names or order: within each class,
the images are ranked by their file's sha256, and the ranks alternate, audit first (0, 2, 4, ... to
the audit half, 1, 3, 5, ... to the selection half). So the same images always split the same way,
each class is split evenly (a class of one image is audited, not selected on), and exact copies of
one file share a half.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

AUDIT, SELECTION = "audit", "selection"


@dataclass(frozen=True)
class Halves:
    """Which images of a set are in the audit half (True) and which in the selection half."""

    audit: torch.Tensor  # (N,) bool

    @property
    def selection(self) -> torch.Tensor:
        return ~self.audit


def split_halves(labels: Sequence[str | None], sha256: Sequence[str]) -> Halves:
    """The halves of a set whose images have these labels and file digests (see the module's doc)."""
    if len(labels) != len(sha256):
        raise ValueError("one label and one sha256 per image")
    by_class: dict[str | None, set[str]] = {}
    for label, digest in zip(labels, sha256):
        by_class.setdefault(label, set()).add(digest)
    in_audit = {(label, digest): rank % 2 == 0
                for label, digests in by_class.items() for rank, digest in enumerate(sorted(digests))}
    return Halves(audit=torch.tensor([in_audit[key] for key in zip(labels, sha256)], dtype=torch.bool))
