"""Shared augmentation and the model's input preparation (see notes: contract "Prepared tensors").

The crop window is chosen before reading, so the loader reads only the pixels it needs from HDF5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from mmtk.data.resize import resize_depth, resize_rgb

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


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
    return x.flip(-1) if flip else x


def prepare_rgb(rgb: np.ndarray, size: tuple[int, int], flip: bool) -> torch.Tensor:
    """uint8 [h, w, 3] crop -> float32 [3, H, W], ImageNet-normalised."""
    rgb = np.require(rgb, requirements=["C", "W"])  # frames decoded from bags are read-only buffers
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None]  # [1, 3, h, w] uint8
    x = flip_width(resize_rgb(x, size), flip)[0]
    return (x.to(torch.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


def robust_mean_std(values: np.ndarray) -> tuple[float, float]:
    """Mean and std (sqrt(var + 1e-6)) of the 10-90 % quantile slice of `values` (1-D, non-empty).

    The statistics of mmtk's robust depth standardisation (MultiMAE's), shared by data preparation,
    xyz normalisation and mapping predicted depth back to metres.
    """
    low, high = _quantiles(values, 0.1, 0.9)
    kept = values[(values >= low) & (values <= high)]
    kept = kept if kept.size else values
    return float(kept.mean(dtype=np.float64)), float(np.sqrt(kept.var(dtype=np.float64) + 1e-6))


def standardize_depth(depth_m: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Robust per-image standardisation (:func:`robust_mean_std` of the valid pixels).

    depth_m, valid: [1, H, W]. Invalid pixels are 0 in the result; no valid pixel gives all zeros.
    """
    depth, mask = depth_m.numpy(), valid.numpy()  # numpy: masked selection is several times faster here
    values = depth[mask]
    if values.size == 0:
        return torch.zeros_like(depth_m)
    mean, std = robust_mean_std(values)
    out = np.where(mask, (depth - np.float32(mean)) / np.float32(std), np.float32(0.0))
    return torch.from_numpy(out.astype(np.float32, copy=False))


def _quantiles(values: np.ndarray, q_low: float, q_high: float) -> tuple[float, float]:
    """Linear-interpolated quantiles (same definition as torch.quantile) by partial sort, O(n)."""
    positions = [q * (values.size - 1) for q in (q_low, q_high)]
    ranks = sorted({int(np.floor(p)) for p in positions} | {int(np.ceil(p)) for p in positions})
    part = np.partition(values, ranks)

    def at(p: float) -> float:
        below, above = float(part[int(np.floor(p))]), float(part[int(np.ceil(p))])
        return below + (above - below) * (p - np.floor(p))

    return at(positions[0]), at(positions[1])


def prepare_depth(depth: np.ndarray, size: tuple[int, int], flip: bool) -> dict[str, torch.Tensor]:
    """Metric depth crop [h, w] (0 = invalid) -> depth (standardised), depth_valid, depth_m, each [1, H, W]."""
    d = torch.from_numpy(np.ascontiguousarray(depth, dtype=np.float32))[None, None]
    d, valid = resize_depth(d, size)
    d, valid = flip_width(d[0], flip), flip_width(valid[0], flip)  # [1, H, W]
    return {"depth": standardize_depth(d, valid), "depth_valid": valid, "depth_m": d}

