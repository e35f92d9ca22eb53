"""Depth: robustly standardised depth [B, 1, H, W]; L1 on hidden, valid pixels.

Stored as ``depth`` float32 [H, W] metres, 0 = invalid (``depth_raw``: the unfilled sensor depth, same
convention). Pixels the sensor did not measure (``valid["depth"]`` False) never enter the loss.

Prepared by robust per-image standardisation (MultiMAE's): with m, s the mean and std (sqrt(var + 1e-6)) of the
valid depths between their 10 % and 90 % quantiles, ``depth = (metres - m) / s``; invalid pixels are 0.
A prediction goes back to metres with the frame's own m and s (:meth:`Depth.to_units`).

Read from a pseudo-label of relative inverse depth (units attr ``relative-inverse``, `mmtk pseudo-label`), the
prepared tensor is the standardised *negative* inverse depth: larger = farther as for depth, and exact up to
the network's unknown scale and shift (depth itself is not: 1 / (inverse depth + shift) is no affine map of
depth). Such a crop has no ``<name>_m`` (it is no distance).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmtk.data.resize import resize_depth
from mmtk.data.transforms import flip_width
from mmtk.data.values import check_metric_values, check_plausible_metres
from mmtk.modality import RELATIVE_INVERSE_UNITS, Modality, StoredArray, register_modality

METRES = ("float32", "float64")


@register_modality
class Depth(Modality):
    name = "depth"
    channels = 1
    task_family = "depth"
    stores = (StoredArray("depth", "metric", METRES, "m"), StoredArray("depth_raw", "metric", METRES, "m"))
    inverse = False  # the stored dataset holds relative inverse depth (set by bind_stored)
    preparation = "metres, robust per-image standardisation (10-90% quantile slice), invalid = 0"

    def check_stored(self, stored: StoredArray, array: Any, frame_id: object) -> np.ndarray:
        depth = stored.check(array, frame_id)
        if stored.units == "m":
            check_plausible_metres(stored.name, depth, frame_id)
        return depth

    def bind_stored(self, name: str, attrs: dict[str, Any]) -> None:
        self.inverse = str(attrs.get("units", "")) == RELATIVE_INVERSE_UNITS

    def load(self, read, window, image_size: tuple[int, int]) -> dict[str, Tensor]:
        """Standardised depth, its validity map and the metric crop (``<name>_m``) for depth metrics.

        Stored values that mmtk never writes (non-finite, negative, beyond 1000 m) are refused: they mean
        a corrupt or hand-edited file."""
        stored = read(self.name)
        check_metric_values(self.name, stored)
        prepared = prepare_depth(stored, image_size, window.flip)
        if self.inverse:  # standardising is affine-equivariant: this is the standardised negative inverse depth
            return {self.name: -prepared["depth"], f"{self.name}_valid": prepared["depth_valid"]}
        return {self.name: prepared["depth"], f"{self.name}_valid": prepared["depth_valid"],
                f"{self.name}_m": prepared["depth_m"]}

    def to_units(self, standardised: Tensor, measured: Tensor, valid: Tensor) -> Tensor:
        """Standardised depth [B, 1, H, W] in metres with each frame's robust mean and std of its valid measured
        depths (> 0): the inverse of :func:`standardize_depth`. A frame without one stays as it is."""
        stats = []
        for depth, mask in zip(measured.cpu().numpy(), valid.cpu().numpy()):
            values = depth[mask.astype(bool) & (depth > 0)]
            stats.append(robust_mean_std(values) if values.size else (0.0, 1.0))
        mean, std = torch.tensor(stats, dtype=standardised.dtype, device=standardised.device).unbind(1)
        return standardised * std.view(-1, 1, 1, 1) + mean.view(-1, 1, 1, 1)

    def valid_pixels(self, inputs: dict[str, Tensor], valid: dict[str, Tensor]) -> Tensor | None:
        mask = valid.get(self.name)
        return None if mask is None else mask.reshape(mask.shape[0], *mask.shape[-2:]).bool()

    def pixel_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return (pred - target).abs().mean(dim=1)  # [B, H, W]


def prepare_depth(depth: np.ndarray, size: tuple[int, int], flip: bool) -> dict[str, Tensor]:
    """Metric depth crop [h, w] (0 = invalid) -> depth (standardised), depth_valid, depth_m, each [1, H, W]."""
    d = torch.from_numpy(np.ascontiguousarray(depth, dtype=np.float32))[None, None]
    d, valid = resize_depth(d, size)
    d, valid = flip_width(d[0], flip), flip_width(valid[0], flip)  # [1, H, W]
    return {"depth": standardize_depth(d, valid), "depth_valid": valid, "depth_m": d}


def standardize_depth(depth_m: Tensor, valid: Tensor) -> Tensor:
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


def robust_mean_std(values: np.ndarray) -> tuple[float, float]:
    """Mean and std (sqrt(var + 1e-6)) of the 10-90 % quantile slice of `values` (1-D, non-empty).

    The statistics of mmtk's robust depth standardisation (MultiMAE's), shared by depth preparation, xyz
    normalisation and mapping predicted depth back to metres.
    """
    low, high = _quantiles(values, 0.1, 0.9)
    kept = values[(values >= low) & (values <= high)]
    kept = kept if kept.size else values
    return float(kept.mean(dtype=np.float64)), float(np.sqrt(kept.var(dtype=np.float64) + 1e-6))


def _quantiles(values: np.ndarray, q_low: float, q_high: float) -> tuple[float, float]:
    """Linear-interpolated quantiles (same definition as torch.quantile) by partial sort, O(n)."""
    positions = [q * (values.size - 1) for q in (q_low, q_high)]
    ranks = sorted({int(np.floor(p)) for p in positions} | {int(np.ceil(p)) for p in positions})
    part = np.partition(values, ranks)

    def at(p: float) -> float:
        below, above = float(part[int(np.floor(p))]), float(part[int(np.ceil(p))])
        return below + (above - below) * (p - np.floor(p))

    return at(positions[0]), at(positions[1])
