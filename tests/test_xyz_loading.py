"""The xyz modality is served by the HDF5 loader through its adapter alone (depth + intrinsics per crop)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import kinect_frame, kinect_intrinsics
from mmtk.adapters.xyz import prepare_xyz_from_depth
from mmtk.data import H5Dataset, H5Writer
from mmtk.data.transforms import CropWindow

K = kinect_intrinsics()


@pytest.fixture(scope="module")
def kinect_file(tmp_path_factory) -> Path:
    rgb, depth_m = kinect_frame()
    out = tmp_path_factory.mktemp("xyz") / "kinect.h5"
    with H5Writer(out, source="test: PCL Kinect frame") as writer:
        writer.add_frame("all", {"rgb": rgb, "depth": depth_m}, intrinsics=K.astype(np.float32))
    return out


def test_full_frame_xyz_equals_back_projection(kinect_file):
    sample = H5Dataset(kinect_file, split="all", modalities=("rgb", "xyz"), image_size=None)[0]
    _, depth_m = kinect_frame()
    expected, valid = prepare_xyz_from_depth(depth_m, K)
    assert torch.equal(sample["xyz_valid"], valid)
    torch.testing.assert_close(sample["xyz"], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("flip", [False, True])
def test_cropped_xyz_keeps_each_pixels_ray(kinect_file, flip):
    """A crop changes the principal point: x/z and y/z of each pixel must stay those of the full frame."""
    dataset = H5Dataset(kinect_file, split="all", modalities=("xyz",), image_size=(160, 200), augment=True)
    window = CropWindow(top=100, left=150, height=160, width=200, flip=flip)
    dataset.window = lambda: window  # a fixed crop, no resize
    sample = dataset[0]
    _, depth_m = kinect_frame()
    full, full_valid = prepare_xyz_from_depth(depth_m, K)
    crop, crop_valid = full[:, 100:260, 150:350], full_valid[:, 100:260, 150:350]
    xyz, valid = sample["xyz"], sample["xyz_valid"]
    if flip:
        xyz, valid = xyz.flip(-1), valid.flip(-1)
        xyz = xyz * torch.tensor([-1.0, 1.0, 1.0]).view(3, 1, 1)
    assert torch.equal(valid, crop_valid)
    v = valid[0]
    # Normalisation scales all axes by one factor: x and y differ from the full frame's by one ratio.
    ratio_x = xyz[0][v] / crop[0][v]
    ratio_y = xyz[1][v] / crop[1][v]
    finite = torch.isfinite(ratio_x) & (crop[0][v].abs() > 1e-3)
    assert ratio_x[finite].std() < 1e-4 and ratio_y[crop[1][v].abs() > 1e-3].std() < 1e-4
    torch.testing.assert_close(ratio_x[finite].mean(), ratio_y[crop[1][v].abs() > 1e-3].mean(), rtol=1e-4, atol=0)
