"""RGB: ImageNet-normalised colour [B, 3, H, W]; MSE on hidden patches.

Stored as ``rgb`` uint8 [H, W, 3] (sRGB, channels R, G, B): JPEG bytes as the source gave them, other colour
losslessly as QOI (fast to decode).
"""

from __future__ import annotations

import numpy as np
import torch.nn.functional as F
from torch import Tensor

from mmtk.modality import Modality, StoredArray, register_modality
from mmtk.data.transforms import IMAGENET_MEAN, IMAGENET_STD, prepare_rgb


@register_modality
class RGB(Modality):
    name = "rgb"
    channels = 3
    colour = True  # colour jitter / grayscale of the finetuning augmentations apply
    stores = (StoredArray("rgb", "image", ("uint8",), "uint8 sRGB, channels R,G,B", channels=3, codec="qoi"),)

    def load(self, read, window, image_size: tuple[int, int]) -> dict[str, Tensor]:
        return {self.name: prepare_rgb(read(self.name), image_size, window.flip)}

    def picture(self, prepared: Tensor) -> np.ndarray:
        rgb = (prepared * IMAGENET_STD + IMAGENET_MEAN).clamp(0, 1)  # [3, H, W]
        return (rgb.permute(1, 2, 0).numpy() * 255).astype(np.uint8)

    def pixel_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(pred, target, reduction="none").mean(dim=1)  # [B, H, W]
