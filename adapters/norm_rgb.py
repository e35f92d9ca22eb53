"""norm_rgb: a target-only task predicting RGB normalised per patch (MAE's `norm_pix_loss`).

The target is each patch of the ImageNet-normalised RGB standardised by its own mean and unbiased
variance over all its pixels and channels (eps 1e-6). Its loss uses the RGB token mask.
"""

from __future__ import annotations

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from mmtk.modality import Modality, register_modality

PATCH_VAR_EPS = 1e-6


def normalize_patches(rgb: Tensor, patch_size: int) -> Tensor:
    """Standardise every patch of [B, C, H, W] by its own mean and unbiased variance."""
    patches = rearrange(rgb, "b c (h p) (w q) -> b h w (p q c)", p=patch_size, q=patch_size)
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    patches = (patches - mean) / (var + PATCH_VAR_EPS).sqrt()
    return rearrange(patches, "b h w (p q c) -> b c (h p) (w q)", p=patch_size, q=patch_size)


@register_modality
class NormRGB(Modality):
    name = "norm_rgb"
    channels = 3
    is_input = False
    mask_source = "rgb"

    def target(self, inputs: dict[str, Tensor]) -> Tensor | None:
        rgb = inputs.get("rgb")
        return None if rgb is None else normalize_patches(rgb, self.patch_size)

    def pixel_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(pred, target, reduction="none").mean(dim=1)  # [B, H, W]
