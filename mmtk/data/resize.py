"""Resizing that respects each modality: bilinear RGB, nearest labels, validity-aware depth.

All functions work on torch tensors with a leading batch/channel layout ``[1, C, H, W]`` and are used
both when converting (``--size``) and when augmenting in the loader.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def resize_rgb(rgb: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (antialiased) resize of uint8 or float RGB. rgb: [1, 3, H, W] -> [1, 3, *size]."""
    if tuple(rgb.shape[-2:]) == tuple(size):
        return rgb
    # uint8 channels-last input takes torch's fast antialiased path and stays uint8.
    return F.interpolate(rgb.contiguous(memory_format=torch.channels_last), size=size, mode="bilinear",
                         antialias=True, align_corners=False)


def resize_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest resize of labels or masks. labels: [1, 1, H, W] (any dtype) -> [1, 1, *size]."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    dtype = labels.dtype
    work = labels if dtype in (torch.uint8, torch.float32) else labels.to(torch.float32)
    if dtype == torch.bool:
        work = labels.to(torch.uint8)
    # nearest-exact picks the source pixel whose centre is closest, which is always one of the pixels
    # the bilinear depth resize below gives weight to (so valid pixels always get a depth value).
    out = F.interpolate(work, size=size, mode="nearest-exact")
    return out.to(dtype)


def resize_depth(depth: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize metric depth without mixing valid (> 0) and invalid (0) pixels.

    The validity mask is resized with nearest; each valid output pixel gets the bilinear average of the
    valid input pixels only (normalised convolution). depth: [1, 1, H, W] float32 metres.
    Returns (depth [1, 1, *size] with 0 where invalid, valid bool [1, 1, *size]).
    """
    valid = depth > 0
    if tuple(depth.shape[-2:]) == tuple(size):
        return depth, valid
    both = torch.empty((1, 2, *depth.shape[-2:]), dtype=torch.float32)  # [1, 2, H, W]: depth*valid, valid
    both[0, 0] = depth[0, 0]  # invalid pixels are already 0, so depth == depth * valid
    both[0, 1] = valid[0, 0]
    both = F.interpolate(both, size=size, mode="bilinear", antialias=True, align_corners=False)
    valid_out = resize_labels(valid, size)
    total, weight = both[:, :1], both[:, 1:]
    keep = valid_out & (weight > 1e-6)
    out = torch.where(keep, total / weight.clamp_min(1e-6), 0.0)
    return out, keep


def resize_frame_arrays(size: tuple[int, int], rgb: np.ndarray, depth: np.ndarray | None = None,
                        depth_raw: np.ndarray | None = None, semseg: np.ndarray | None = None,
                        intrinsics: np.ndarray | None = None) -> dict[str, np.ndarray | None]:
    """Resize one frame given as numpy arrays (rgb [H,W,3] uint8, depth [H,W] m, semseg [H,W]) to size=(h, w).

    Intrinsics are scaled so that pixel centres map exactly (0-based convention).
    """
    height, width = rgb.shape[:2]
    out: dict[str, np.ndarray | None] = {}
    rgb_t = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]
    out["rgb"] = resize_rgb(rgb_t, size)[0].permute(1, 2, 0).contiguous().numpy()
    for key, value in (("depth", depth), ("depth_raw", depth_raw)):
        out[key] = None if value is None else resize_depth(torch.from_numpy(value)[None, None], size)[0][0, 0].numpy()
    out["semseg"] = None if semseg is None else resize_labels(torch.from_numpy(semseg)[None, None], size)[0, 0].numpy()
    if intrinsics is not None:
        sx, sy = size[1] / width, size[0] / height
        k = np.array(intrinsics, dtype=np.float64)
        k[0, 0] *= sx
        k[1, 1] *= sy
        k[0, 2] = (k[0, 2] + 0.5) * sx - 0.5
        k[1, 2] = (k[1, 2] + 0.5) * sy - 0.5
        out["intrinsics"] = k.astype(np.float32)
    else:
        out["intrinsics"] = None
    return out
