"""XYZ: per-pixel camera-frame coordinates [B, 3, H, W] (x right, y down, z forward), as a modality.

The prepared tensor comes from metric depth + intrinsics, from an organized point cloud, or from an
unorganized cloud projected with intrinsics (see :func:`prepare_xyz_from_depth` and
:func:`prepare_xyz_from_cloud`). It is normalised like depth, with one scale for all three axes so
the geometry keeps its shape: with m, s the robust mean and std of the valid z values (10-90% quantile
slice, s = sqrt(var + 1e-6)), ``xyz = (x / s, y / s, (z - m) / s)``; invalid pixels are 0 and are
marked in the validity map ``valid["xyz"]`` [B, 1, H, W]. The loss is L1 on hidden, valid pixels.

Augmentation note: a random resized crop keeps each pixel's camera-frame point, so crop xyz like depth
(nearest); a horizontal flip mirrors the scene, so negate x (:func:`flip_xyz`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from mmtk.data.values import check_metric_values
from mmtk.modality import register_modality
from mmtk.adapters.depth import Depth, robust_mean_std


@register_modality
class XYZ(Depth):
    """Tokenized, validated and scored like depth (L1 on hidden, valid pixels), with 3 channels."""

    name = "xyz"
    channels = 3
    task_family = None  # not a finetuning task (yet): no metric on camera-frame points
    stores = ()  # nothing of its own: computed per crop from metric depth and K
    stored_from = ("depth", "intrinsics")
    preparation = ("camera-frame metres from depth and intrinsics, divided by the robust std of z (10-90% quantile "
                   "slice), z less its robust mean; invalid = 0")

    def load(self, read, window, image_size: tuple[int, int]) -> dict[str, Tensor]:
        from mmtk.data.resize import resize_depth, window_intrinsics

        stored = read("depth")
        check_metric_values("depth", stored)  # as Depth.load refuses corrupt values
        depth = torch.from_numpy(np.ascontiguousarray(stored, dtype=np.float32))[None, None]
        depth, _ = resize_depth(depth, image_size)  # valid-aware resize of the crop, metres
        intrinsics = window_intrinsics(read("intrinsics"), window, image_size)
        xyz, valid = prepare_xyz_from_depth(depth[0, 0].numpy(), intrinsics)
        if window.flip:
            xyz, valid = flip_xyz(xyz), valid.flip(-1)
        return {"xyz": xyz, "xyz_valid": valid}


def normalise_xyz(xyz: np.ndarray) -> tuple[Tensor, Tensor]:
    """Metres [H, W, 3] (NaN = invalid) -> (prepared xyz [3, H, W] float32, valid [1, H, W] bool)."""
    xyz = np.asarray(xyz, dtype=np.float64)
    valid = np.isfinite(xyz).all(axis=-1) & (xyz[..., 2] > 0)
    out = np.zeros(xyz.shape, dtype=np.float32)
    if valid.any():
        mean, scale = robust_mean_std(xyz[..., 2][valid])
        out[valid] = ((xyz[valid] - [0.0, 0.0, mean]) / scale).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1))), torch.from_numpy(valid)[None]


def prepare_xyz_from_depth(depth_m: np.ndarray, intrinsics: np.ndarray) -> tuple[Tensor, Tensor]:
    """Prepared xyz and validity from metric depth [H, W] (0 = invalid) and K [3, 3]."""
    from mmtk.pointcloud import depth_to_xyz

    return normalise_xyz(depth_to_xyz(depth_m, intrinsics))


def prepare_xyz_from_cloud(cloud, intrinsics: np.ndarray | None = None,
                           image_size: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
    """Prepared xyz and validity from a :class:`mmtk.pointcloud.PointCloud`.

    An organized cloud is used pixel for pixel; an unorganized one is projected (nearest point wins), which
    needs the camera intrinsics and image size (otherwise a clear MmtkError).
    """
    from mmtk.pointcloud import cloud_to_xyz

    return normalise_xyz(cloud_to_xyz(cloud, intrinsics, image_size))


def flip_xyz(xyz: Tensor) -> Tensor:
    """Horizontal flip of prepared xyz [..., 3, H, W]: mirror the image and negate x."""
    flipped = xyz.flip(-1).clone()
    flipped[..., 0, :, :] = -flipped[..., 0, :, :]
    return flipped
