"""Dense prediction heads for finetuning: a ConvNeXt head (segmentation) and a DPT head (depth).

Both read the tokens of the "main" input modalities (not the global token) and return a map at the
image resolution.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from einops import rearrange
from timm.layers import DropPath
from torch import Tensor, nn

from mmtk.model.layers import layer_norm


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block: depth-wise 7x7 conv, LayerNorm, MLP (4x), residual. x: [B, C, H, W]."""

    def __init__(self, dim: int, drop_path: float = 0.0) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = layer_norm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)  # channels last for norm and MLP
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class ConvNeXtHead(nn.Module):
    """Segmentation head (MultiMAE's ConvNeXt adapter).

    Each token is projected to `embed_dim` values read as a (k x k) block of pixels with
    embed_dim / k^2 channels (k^2 = preds_per_patch), giving a map at 1/(patch/k) resolution;
    ConvNeXt blocks refine it, a 1x1 conv gives class logits, bilinear upsampling the full size.
    """

    def __init__(self, in_dim: int, num_classes: int, embed_dim: int = 6144, preds_per_patch: int = 16,
                 depth: int = 4) -> None:
        super().__init__()
        self.side = math.isqrt(preds_per_patch)
        if self.side**2 != preds_per_patch or embed_dim % preds_per_patch:
            raise ValueError("preds_per_patch must be a square dividing embed_dim")
        class_dim = embed_dim // preds_per_patch
        self.proj_dec = nn.Linear(in_dim, embed_dim)
        self.blocks = nn.Sequential(*[ConvNeXtBlock(class_dim) for _ in range(depth)])
        self.final_layer = nn.Conv2d(class_dim, num_classes, kernel_size=1)

    def forward(self, tokens: Tensor, grid: tuple[int, int], image_size: tuple[int, int]) -> Tensor:
        """tokens: [B, N, in_dim] -> logits [B, num_classes, H, W]."""
        x = self.proj_dec(tokens)  # [B, N, k*k*c]
        x = rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=grid[0], w=grid[1], p=self.side, q=self.side)
        x = self.final_layer(self.blocks(x))
        return F.interpolate(x, size=image_size, mode="bilinear", align_corners=False)


class ResidualConvUnit(nn.Module):
    """relu -> conv3x3 -> relu -> conv3x3, plus the input."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FusionBlock(nn.Module):
    """DPT fusion: add the (refined) skip feature, refine, upsample x2, 1x1 conv."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.res1 = ResidualConvUnit(dim)
        self.res2 = ResidualConvUnit(dim)
        self.out_conv = nn.Conv2d(dim, dim, kernel_size=1)

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        if skip is not None:
            x = x + self.res1(skip)
        x = self.res2(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class DPTHead(nn.Module):
    """Dense Prediction Transformer head (Ranftl et al., 2021) on four encoder blocks.

    Tokens of the hooked blocks are reassembled into maps at 4x, 2x, 1x and 1/2x the token grid,
    projected to `feature_dim`, fused coarse to fine, and decoded to `out_channels` at full size.
    """

    def __init__(self, in_dim: int, out_channels: int = 1, hooks: tuple[int, ...] = (2, 5, 8, 11),
                 layer_dims: tuple[int, ...] = (96, 192, 384, 768), feature_dim: int = 256) -> None:
        super().__init__()
        self.hooks = tuple(hooks)
        d1, d2, d3, d4 = layer_dims
        self.reassemble = nn.ModuleList([
            nn.Sequential(nn.Conv2d(in_dim, d1, 1), nn.ConvTranspose2d(d1, d1, kernel_size=4, stride=4)),
            nn.Sequential(nn.Conv2d(in_dim, d2, 1), nn.ConvTranspose2d(d2, d2, kernel_size=2, stride=2)),
            nn.Sequential(nn.Conv2d(in_dim, d3, 1)),
            nn.Sequential(nn.Conv2d(in_dim, d4, 1), nn.Conv2d(d4, d4, kernel_size=3, stride=2, padding=1)),
        ])
        self.project = nn.ModuleList([nn.Conv2d(d, feature_dim, 3, padding=1, bias=False) for d in layer_dims])
        self.fusion = nn.ModuleList([FusionBlock(feature_dim) for _ in layer_dims])  # fusion[0] is the finest
        self.output = nn.Sequential(
            nn.Conv2d(feature_dim, feature_dim // 2, kernel_size=3, padding=1),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(feature_dim // 2, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, out_channels, kernel_size=1),
        )

    def forward(self, block_tokens: list[Tensor], grid: tuple[int, int]) -> Tensor:
        """block_tokens: the hooked blocks' tokens, each [B, N, in_dim] -> [B, out_channels, H, W]."""
        maps = [rearrange(t, "b (h w) c -> b c h w", h=grid[0], w=grid[1]) for t in block_tokens]
        maps = [project(reassemble(m)) for m, reassemble, project in zip(maps, self.reassemble, self.project)]
        x = self.fusion[3](maps[3])
        for level in (2, 1, 0):
            x = self.fusion[level](x, maps[level])
        return self.output(x)
