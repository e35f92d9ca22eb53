"""RGB: ImageNet-normalised colour [B, 3, H, W]; MSE on hidden patches."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from mmtk.adapters.base import Modality, register_modality


@register_modality
class RGB(Modality):
    name = "rgb"
    channels = 3

    def pixel_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(pred, target, reduction="none").mean(dim=1)  # [B, H, W]
