"""Modality-free geometry of the loader's augmentation: crop windows and horizontal flips.

The crop window is chosen before reading, so the loader reads only the pixels it needs from HDF5. How a crop
becomes a prepared tensor (colour normalisation, depth standardisation, ...) is each adapter's own
(`Modality.load` in adapters/).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CropWindow:
    """A crop (top, left, height, width) in source pixels and whether to flip horizontally."""

    top: int
    left: int
    height: int
    width: int
    flip: bool = False

    @property
    def rows(self) -> slice:
        return slice(self.top, self.top + self.height)

    @property
    def cols(self) -> slice:
        return slice(self.left, self.left + self.width)


def full_window(height: int, width: int) -> CropWindow:
    """The whole frame, no flip."""
    return CropWindow(0, 0, height, width, False)


def random_resized_crop(height: int, width: int, scale: tuple[float, float] = (0.2, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: bool = True,
                        generator: torch.Generator | None = None) -> CropWindow:
    """Sample a crop covering a random fraction ``scale`` of the area with aspect ratio in ``ratio``.

    Uses torch's RNG, which DataLoader seeds differently in every worker. After 10 rejected draws it
    falls back to the largest centred crop whose aspect ratio is inside ``ratio``.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    flip = bool(hflip and torch.rand(1, generator=generator).item() < 0.5)
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator).item())
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(torch.randint(0, height - crop_h + 1, (1,), generator=generator).item())
            left = int(torch.randint(0, width - crop_w + 1, (1,), generator=generator).item())
            return CropWindow(top, left, crop_h, crop_w, flip)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_w, crop_h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        crop_h, crop_w = height, int(round(height * ratio[1]))
    else:
        crop_w, crop_h = width, height
    return CropWindow((height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w, flip)


def flip_width(x: torch.Tensor, flip: bool) -> torch.Tensor:
    """``x`` [..., W] mirrored along its last (width) axis when ``flip``, else ``x`` itself."""
    return x.flip(-1) if flip else x
