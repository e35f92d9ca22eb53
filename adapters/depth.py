"""Depth: robustly standardised depth [B, 1, H, W]; L1 on hidden, valid pixels.

Stored as ``depth`` float32 [H, W] metres, 0 = invalid (``depth_raw``: the unfilled sensor depth, same
convention). Pixels the sensor did not measure (``valid["depth"]`` False) never enter the loss.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor

from mmtk.modality import Modality, StoredArray, register_modality
from mmtk.data.transforms import prepare_depth
from mmtk.errors import MmtkError

# A median beyond this is millimetres given as metres; below MIN it is metres read as millimetres (or worse).
MAX_PLAUSIBLE_MEDIAN_M = 80.0
MIN_PLAUSIBLE_MEDIAN_M = 0.05
METRES = ("float32", "float64")


@register_modality
class Depth(Modality):
    name = "depth"
    channels = 1
    metric_family = "depth"
    stores = (StoredArray("depth", "metric", METRES, "m"), StoredArray("depth_raw", "metric", METRES, "m"))

    def check_stored(self, stored: StoredArray, array: Any, frame_id: object) -> np.ndarray:
        depth = stored.check(array, frame_id)
        if stored.units == "m":
            check_plausible_metres(stored.name, depth, frame_id)
        return depth

    def load(self, read, window, image_size: tuple[int, int]) -> dict[str, Tensor]:
        """Standardised depth, its validity map and the metric crop (``<name>_m``) for depth metrics."""
        prepared = prepare_depth(read(self.name), image_size, window.flip)
        return {self.name: prepared["depth"], f"{self.name}_valid": prepared["depth_valid"],
                f"{self.name}_m": prepared["depth_m"]}

    def valid_pixels(self, inputs: dict[str, Tensor], valid: dict[str, Tensor]) -> Tensor | None:
        mask = valid.get(self.name)
        return None if mask is None else mask.reshape(mask.shape[0], *mask.shape[-2:]).bool()

    def pixel_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return (pred - target).abs().mean(dim=1)  # [B, H, W]


def check_plausible_metres(name: str, depth: np.ndarray, frame_id: object) -> None:
    """Refuse depth whose median says it is not in metres (one line naming --depth-scale)."""
    valid = depth[depth > 0]
    if valid.size == 0:
        return
    median = float(np.median(valid[:: max(1, valid.size // 20000)]))
    if median > MAX_PLAUSIBLE_MEDIAN_M:
        raise MmtkError(f"frame {frame_id}: {name} median is {median:.0f} m, which looks like millimetres given as "
                        f"metres; pass --depth-scale 1000 (units per metre)")
    if median < MIN_PLAUSIBLE_MEDIAN_M:
        raise MmtkError(f"frame {frame_id}: {name} median is {median:.4f} m, implausibly close for a depth sensor; "
                        f"the depth units are probably wrong: pass --depth-scale (units per metre, e.g. 1 for "
                        f"metres, 1000 for millimetres)")
