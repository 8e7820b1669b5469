"""Copies of one photo in a forget or anchor set: the same image re-encoded, resized, brightened or
moved by a pixel. A copy counted as another image would let the generalisation check hold back an
image the run trains on (and call it unseen), let an anchor hold a forget image in place, and make
one photo look like two.

Two images are near-duplicates when their 8x8 grey thumbnails (area averages of the decoded,
card-sized pixels) differ by at most ``NEAR`` on average: a JPEG re-encode, a brightness step or a
little noise stays below it; photos of one person taken apart (another pose, light or expression)
mostly stay above it. In the Yale faces' training photos, 3 people have an exact copy and 3 more a
pair within it (nearly the same shot): each counts as one photo. The digits' closest pair: 4 levels.
Not caught: a copy moved or cropped by more than the thumbnail absorbs (a one-pixel shift of a sharp
image).
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

THUMBNAIL = 8
NEAR = 3 / 255  # mean absolute difference of the thumbnails, pixel values in [0, 1]


def thumbnails(pixels: torch.Tensor) -> torch.Tensor:
    """(N, 64) grey 8x8 area averages in [0, 1] of (N, C, H, W) images: uint8, or float in [0, 1]."""
    scale = 255.0 if pixels.dtype == torch.uint8 else 1.0
    grey = pixels.float().mean(1, keepdim=True) / scale
    return F.adaptive_avg_pool2d(grey, THUMBNAIL).flatten(1)


def near(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(len(a), len(b)) bool: which thumbnails are near-duplicates."""
    if not len(a) or not len(b):
        return torch.zeros(len(a), len(b), dtype=torch.bool)
    return torch.cdist(a, b, p=1) / a.shape[1] <= NEAR


def first_copies(pixels: torch.Tensor) -> torch.Tensor:
    """long (N,): for each image, the index of the first image with exactly its decoded pixels (its own
    index when it is the first)."""
    first: dict[bytes, int] = {}
    return torch.tensor([first.setdefault(hashlib.sha256(image.numpy().tobytes()).digest(), i)
                         for i, image in enumerate(pixels)], dtype=torch.long)


def exact_duplicates(pixels: torch.Tensor) -> torch.Tensor:
    """bool (N,): images whose decoded pixels repeat an earlier image's exactly."""
    return first_copies(pixels) != torch.arange(pixels.shape[0])


def groups(pixels: torch.Tensor) -> torch.Tensor:
    """long (N,): a group id per image, near-duplicates sharing one (transitively); ids 0..G-1 in
    order of each group's first image."""
    thumbs = thumbnails(pixels)
    parent = list(range(len(thumbs)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in near(thumbs, thumbs).triu(1).nonzero().tolist():
        parent[root(j)] = root(i)
    ids: dict[int, int] = {}
    return torch.tensor([ids.setdefault(root(i), len(ids)) for i in range(len(thumbs))], dtype=torch.long)


def distinct_count(pixels: torch.Tensor) -> int:
    """How many different photos a set holds, near-duplicates counted once."""
    return int(groups(pixels).max()) + 1 if len(pixels) else 0


def any_near(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether an image of ``a`` is a near-duplicate of one of ``b`` (uint8 image tensors)."""
    return bool(near(thumbnails(a), thumbnails(b)).any())
