"""Random views of the forget images: forget a person under variations, not a few pixel arrays.

With a handful of forget images, a run can drive exactly those arrays to another class while
unseen photos of the same person are still recognised (benchmarks/README.md, the face table).
Training on a fresh random view of each image at every step (a crop, a mirror image, another
exposure) asks the adapters to move what the views share: the person, not the pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from worker.engine.package import InputSpec


@dataclass(frozen=True)
class Augmentation:
    """The range of each random change; a view draws one value of each, per image.

    Args:
        min_scale: the crop's side as a fraction of the image's (0.8: up to 20 % cut away), then
            resized back to the input size.
        flip: mirror half of the views left to right.
        brightness: exposure multiplied by a factor in [1 - b, 1 + b].
        contrast: deviation from the image's mean multiplied by a factor in [1 - c, 1 + c].
    """

    min_scale: float = 0.8
    flip: bool = True
    brightness: float = 0.2
    contrast: float = 0.2

    def views(self, images: torch.Tensor, spec: InputSpec, generator: torch.Generator) -> torch.Tensor:
        """One random view of each image: (N, C, H, W) normalised -> (N, C, H, W) normalised.

        Parameters are drawn on the CPU from ``generator``, so a seeded run draws the same views on
        any device.
        """
        n = images.shape[0]
        draw = lambda low, high: (low + (high - low) * torch.rand(n, generator=generator)).to(images.device)  # noqa: E731
        scale = draw(self.min_scale, 1.0)
        # A crop of side ``scale`` anywhere inside the image: its centre moves at most 1 - scale
        # (affine_grid's coordinates run from -1 to 1).
        shift_x, shift_y = draw(-1.0, 1.0) * (1 - scale), draw(-1.0, 1.0) * (1 - scale)
        mirror = (torch.rand(n, generator=generator) < 0.5).to(images.device) if self.flip else torch.zeros(n, dtype=torch.bool, device=images.device)
        theta = torch.zeros(n, 2, 3, device=images.device)
        theta[:, 0, 0] = torch.where(mirror, -scale, scale)
        theta[:, 1, 1] = scale
        theta[:, 0, 2], theta[:, 1, 2] = shift_x, shift_y
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        moved = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return self._photometric(moved, spec, draw(1 - self.brightness, 1 + self.brightness),
                                 draw(1 - self.contrast, 1 + self.contrast))

    @staticmethod
    def _photometric(images: torch.Tensor, spec: InputSpec, brightness: torch.Tensor,
                     contrast: torch.Tensor) -> torch.Tensor:
        """Exposure and contrast in pixel space ([0, 1]), clipped to valid pixels, normalised again."""
        mean = torch.tensor(spec.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(spec.std, device=images.device).view(1, -1, 1, 1)
        pixels = images * std + mean
        centre = pixels.mean(dim=(1, 2, 3), keepdim=True)
        pixels = (pixels - centre) * contrast.view(-1, 1, 1, 1) + centre
        pixels = (pixels * brightness.view(-1, 1, 1, 1)).clamp(0.0, 1.0)
        return (pixels - mean) / std


DEFAULT_AUGMENTATION = Augmentation()
