"""Depth: robustly standardised depth [B, 1, H, W]; L1 on hidden, valid pixels.

Pixels the sensor did not measure (``valid["depth"]`` False) never enter the loss.
"""

from __future__ import annotations

from torch import Tensor

from mmtk.adapters.base import Modality, register_modality


@register_modality
class Depth(Modality):
    name = "depth"
    channels = 1

    def valid_pixels(self, inputs: dict[str, Tensor], valid: dict[str, Tensor]) -> Tensor | None:
        mask = valid.get(self.name)
        return None if mask is None else mask.reshape(mask.shape[0], *mask.shape[-2:]).bool()

    def pixel_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return (pred - target).abs().mean(dim=1)  # [B, H, W]
