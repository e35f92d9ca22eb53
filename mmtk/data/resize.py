"""Resizing that respects each modality: bilinear RGB, nearest labels, validity-aware depth.

All functions work on torch tensors with a leading batch/channel layout ``[1, C, H, W]`` and are used
both when converting (``--size``) and when augmenting in the loader. ``--size`` keeps the aspect ratio: the
centred window :func:`cover_window` is cut out and resized, as resizing to cover the size and cropping would.
"""

from __future__ import annotations

from typing import Any

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


def resize_stored(kind: str, array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize one stored array [H, W] or [H, W, C] to size=(h, w) the way its kind needs (see StoredArray).

    "image": bilinear with antialias, rounded back to the integer dtype; "metric": validity-aware
    (:func:`resize_depth`, 0 = invalid); "labels": nearest.
    """
    t = torch.from_numpy(np.require(array, requirements=["C", "W"]))  # frames decoded from bags are read-only
    t = t[None, None] if t.ndim == 2 else t.permute(2, 0, 1)[None]
    if kind == "metric":
        out = resize_depth(t.float(), size)[0]
    elif kind == "labels":
        out = resize_labels(t, size)
    elif array.dtype == np.uint8:
        out = resize_rgb(t, size)
    else:
        info = np.iinfo(array.dtype) if np.issubdtype(array.dtype, np.integer) else None
        out = F.interpolate(t.double(), size=size, mode="bilinear", antialias=True, align_corners=False)
        out = out.round().clamp(info.min, info.max) if info is not None else out
    out = out[0, 0] if array.ndim == 2 else out[0].permute(1, 2, 0)
    return out.contiguous().numpy().astype(array.dtype, copy=False)


def cover_window(from_size: tuple[int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The centred window (top, left, height, width) of an image of from_size=(H, W) that has the aspect ratio of
    size=(h, w): what resizing the image to cover ``size`` and cropping the overflow keeps (the whole image when
    the aspect ratios match)."""
    scale = max(size[0] / from_size[0], size[1] / from_size[1])
    height, width = min(from_size[0], round(size[0] / scale)), min(from_size[1], round(size[1] / scale))
    return (from_size[0] - height) // 2, (from_size[1] - width) // 2, height, width


def window_intrinsics(intrinsics: np.ndarray, window: Any, size: tuple[int, int]) -> np.ndarray:
    """K [3, 3] (float64) of a window (top, left, height, width: a :class:`~mmtk.data.transforms.CropWindow`) of an
    image, resized to size=(h, w): the principal point moves with the window, and pixel centres stay aligned."""
    sx, sy = size[1] / window.width, size[0] / window.height
    k = np.array(intrinsics, dtype=np.float64)
    k[0, 0] *= sx
    k[1, 1] *= sy
    k[0, 2] = (k[0, 2] - window.left + 0.5) * sx - 0.5
    k[1, 2] = (k[1, 2] - window.top + 0.5) * sy - 0.5
    return k
