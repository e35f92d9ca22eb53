"""RGB: ImageNet-normalised colour [B, 3, H, W]; MSE on hidden patches.

Stored as ``rgb`` uint8 [H, W, 3] (sRGB, channels R, G, B): JPEG bytes as the source gave them, other colour
losslessly as QOI (fast to decode). Prepared as ``(uint8 / 255 - IMAGENET_MEAN) / IMAGENET_STD`` per channel.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mmtk.data.resize import resize_rgb
from mmtk.data.transforms import flip_width
from mmtk.modality import Modality, StoredArray, register_modality

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


@register_modality
class RGB(Modality):
    name = "rgb"
    channels = 3
    colour = True  # colour jitter / grayscale of the finetuning augmentations apply
    preparation = "uint8/255 then ImageNet mean/std"
    stores = (StoredArray("rgb", "image", ("uint8",), "uint8 sRGB, channels R,G,B", channels=3, codec="qoi"),)

    def load(self, read, window, image_size: tuple[int, int]) -> dict[str, Tensor]:
        return {self.name: prepare_rgb(read(self.name), image_size, window.flip)}

    def picture(self, prepared: Tensor) -> np.ndarray:
        rgb = (prepared * IMAGENET_STD + IMAGENET_MEAN).clamp(0, 1)  # [3, H, W]
        return (rgb.permute(1, 2, 0).numpy() * 255).astype(np.uint8)

    def pixel_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(pred, target, reduction="none").mean(dim=1)  # [B, H, W]


def prepare_rgb(rgb: np.ndarray, size: tuple[int, int], flip: bool) -> Tensor:
    """uint8 [h, w, 3] crop -> float32 [3, H, W] at ``size``, flipped when ``flip``, ImageNet-normalised."""
    rgb = np.require(rgb, requirements=["C", "W"])  # frames decoded from bags are read-only buffers
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None]  # [1, 3, h, w] uint8
    x = flip_width(resize_rgb(x, size), flip)[0]
    return (x.to(torch.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
