"""Depth: robustly standardised depth [B, 1, H, W]; L1 on hidden, valid pixels.

Stored as ``depth`` float32 [H, W] metres, 0 = invalid (``depth_raw``: the unfilled sensor depth, same
convention). Pixels the sensor did not measure (``valid["depth"]`` False) never enter the loss.

Read from a pseudo-label of relative inverse depth (units attr ``relative-inverse``, `mmtk pseudo-label`), the
prepared tensor is the standardised *negative* inverse depth: larger = farther as for depth, and exact up to
the network's unknown scale and shift (depth itself is not: 1 / (inverse depth + shift) is no affine map of
depth). Such a crop has no ``<name>_m`` (it is no distance).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor

from mmtk.data.transforms import prepare_depth
from mmtk.data.values import check_metric_values, check_plausible_metres
from mmtk.modality import Modality, StoredArray, register_modality
from mmtk.pseudo_label import RELATIVE_INVERSE_UNITS

METRES = ("float32", "float64")


@register_modality
class Depth(Modality):
    name = "depth"
    channels = 1
    task_family = "depth"
    stores = (StoredArray("depth", "metric", METRES, "m"), StoredArray("depth_raw", "metric", METRES, "m"))
    inverse = False  # the stored dataset holds relative inverse depth (set by bind_stored)

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

    def valid_pixels(self, inputs: dict[str, Tensor], valid: dict[str, Tensor]) -> Tensor | None:
        mask = valid.get(self.name)
        return None if mask is None else mask.reshape(mask.shape[0], *mask.shape[-2:]).bool()

    def pixel_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return (pred - target).abs().mean(dim=1)  # [B, H, W]
