"""Point clouds on the real PCL Kinect frame (samples/pcl_kinect) and the ROS bags in ../shared."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import torch
import pytest
from PIL import Image

from data_helpers import KINECT, KINECT_FRAME, SHARED, kinect_intrinsics
from mmtk.errors import MmtkError
from mmtk.pointcloud import (
    PointCloud, cloud_to_depth, cloud_to_image_depth, cloud_to_xyz, depth_to_cloud, depth_to_xyz, intrinsics_matrix,
    parse_intrinsics, project_points, read_cloud, write_cloud,
)
from mmtk.data.sources.ros.clouds import pointcloud2_to_cloud, read_bag_clouds

SAMPLES, FRAME = KINECT, KINECT_FRAME
K = kinect_intrinsics()
needs_shared = pytest.mark.skipif(not (SHARED / "rosbag_pcl_kinect").is_dir(), reason="../shared/data not present")


@pytest.fixture(scope="module")
def depth_mm() -> np.ndarray:
    return np.array(Image.open(SAMPLES / f"{FRAME}_depth.png"))


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    return np.array(Image.open(SAMPLES / f"{FRAME}_rgb.png").convert("RGB"))


@pytest.fixture(scope="module")
def pcd() -> PointCloud:
    return read_cloud(SAMPLES / f"{FRAME}.pcd")


@needs_shared
def test_sample_pngs_equal_the_original_tiffs(depth_mm, rgb):
    tiff = SHARED / "pcl_kinect_grabber" / "tiff"
    assert np.array_equal(np.array(Image.open(tiff / f"{FRAME}_depth.tiff")), depth_mm)
    assert np.array_equal(np.array(Image.open(tiff / f"{FRAME}_rgb.tiff")), rgb)


def test_organized_pcd_keeps_layout_nan_and_colours(pcd, depth_mm, rgb):
    assert pcd.organized and pcd.points.shape == (480, 640, 3)
    assert np.array_equal(~pcd.valid, depth_mm == 0)
    assert pcd.num_invalid == int((depth_mm == 0).sum()) == 35625
    assert np.array_equal(pcd.colors, rgb)


def test_back_projection_reproduces_the_organized_pcd(pcd, depth_mm):
    xyz = depth_to_xyz(depth_mm.astype(np.float32) / 1000.0, K)
    assert np.array_equal(np.isnan(xyz), np.isnan(pcd.points))
    valid = pcd.valid
    # The PCD stores float32 metres; our computation differs by at most float32 rounding.
    np.testing.assert_allclose(xyz[valid], pcd.points[valid], rtol=0, atol=1e-6)
    assert np.abs(pcd.points[valid][:, 0]).max() > 0.3  # non-trivial x range (metres)


def test_organized_cloud_to_depth_and_xyz(pcd, depth_mm):
    depth = cloud_to_depth(pcd)
    np.testing.assert_allclose(depth, depth_mm / 1000.0, rtol=0, atol=1e-6)
    assert np.array_equal(depth == 0, depth_mm == 0)
    assert np.array_equal(cloud_to_xyz(pcd), pcd.points, equal_nan=True)


def test_projecting_the_unorganized_cloud_gives_back_the_depth_image(pcd, depth_mm, rgb):
    result = project_points(pcd, K, (480, 640))
    assert result.skipped_invalid == 35625 and result.skipped_behind == 0 and result.skipped_outside == 0
    assert result.occluded == 0
    np.testing.assert_allclose(result.depth, depth_mm / 1000.0, rtol=0, atol=1e-6)
    assert np.array_equal(result.colors[depth_mm > 0], rgb[depth_mm > 0])
    unorganized = pcd.finite()
    assert not unorganized.organized and len(unorganized.points) == 480 * 640 - 35625
    np.testing.assert_allclose(cloud_to_depth(unorganized, K, (480, 640)), result.depth, rtol=0, atol=0)


@pytest.mark.parametrize("far_first", [False, True])
def test_z_buffer_keeps_the_nearest_point(far_first):
    milk = read_cloud(SAMPLES / "milk_color.pcd")
    assert not milk.organized and milk.points.shape == (13704, 3)
    near = project_points(milk, K, (480, 640))
    assert near.skipped_invalid == 0 and (near.depth > 0).sum() > 1000
    assert 0.7 < near.depth[near.depth > 0].min() and near.depth.max() < 0.9  # the carton, in metres
    # The same points pushed 1.5x further along their rays land on (almost) the same pixels but lose there.
    far_cloud = PointCloud(milk.points * 1.5)
    far = project_points(far_cloud, K, (480, 640))
    stacked = np.concatenate([far_cloud.points, milk.points] if far_first else [milk.points, far_cloud.points])
    both = project_points(PointCloud(stacked), K, (480, 640))
    hit = near.depth > 0
    np.testing.assert_array_equal(both.depth[hit], near.depth[hit])
    np.testing.assert_array_equal(both.depth[~hit], far.depth[~hit])
    assert both.occluded > len(milk.points) // 2


def test_projection_counts_points_behind_and_outside_and_nan():
    points = np.array([[0, 0, 1.0], [0, 0, -1.0], [5.0, 0, 1.0], [np.nan, 0, 1.0], [0, 0, 2.0]], np.float32)
    result = project_points(PointCloud(points), K, (480, 640))
    assert (result.skipped_invalid, result.skipped_behind, result.skipped_outside, result.occluded) == (1, 1, 1, 1)
    assert result.depth[240, 320] == 1.0 and (result.depth > 0).sum() == 1


def test_cloud_registered_to_the_image_needs_no_intrinsics(pcd, depth_mm):
    np.testing.assert_allclose(cloud_to_image_depth(pcd, (480, 640)), depth_mm / 1000.0, rtol=0, atol=1e-6)


def test_unorganized_cloud_without_intrinsics_is_a_clear_error(pcd):
    with pytest.raises(MmtkError, match="intrinsics"):
        cloud_to_depth(pcd.finite())
    with pytest.raises(MmtkError, match="fx,fy,cx,cy"):
        parse_intrinsics("525,525")
    np.testing.assert_array_equal(parse_intrinsics("525,526,320,240"), intrinsics_matrix(525, 526, 320, 240))


def test_depth_to_cloud_unorganized_drops_invalid(depth_mm, rgb):
    cloud = depth_to_cloud(depth_mm / 1000.0, K, rgb, organized=False)
    assert len(cloud.points) == int((depth_mm > 0).sum())
    assert np.array_equal(cloud.colors, rgb[depth_mm > 0])


@pytest.mark.parametrize("suffix", [".ply", ".pcd"])
def test_write_then_read_round_trip(tmp_path, pcd, suffix):
    out = tmp_path / f"cloud{suffix}"
    written = write_cloud(out, pcd)
    assert written == 480 * 640 - 35625
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temporary file left
    back = read_cloud(out)
    finite = pcd.finite()
    np.testing.assert_allclose(back.points, finite.points, rtol=0, atol=1e-6)
    assert np.array_equal(back.colors, finite.colors)


def test_bad_files_are_clear_errors(tmp_path, pcd):
    with pytest.raises(MmtkError, match="no such"):
        read_cloud(tmp_path / "missing.ply")
    bad = tmp_path / "broken.pcd"
    bad.write_bytes(b"not a point cloud at all")
    with pytest.raises(MmtkError, match="no points"):
        read_cloud(bad)
    with pytest.raises(MmtkError, match=".xyz"):
        write_cloud(tmp_path / "cloud.xyz", pcd)
    with pytest.raises(MmtkError, match="no valid points"):
        write_cloud(tmp_path / "empty.ply", PointCloud(np.full((2, 3), np.nan)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.pcd"]


def _as_pointcloud2(cloud: PointCloud, big_endian: bool, padding: int) -> SimpleNamespace:
    """Pack an organized cloud into the PointCloud2 byte layout (x y z rgb, point_step 16, padded rows)."""
    height, width, _ = cloud.points.shape
    order = ">" if big_endian else "<"
    record = np.dtype({"names": ["x", "y", "z", "rgb"], "formats": [order + "f4"] * 3 + [order + "u4"],
                       "offsets": [0, 4, 8, 12], "itemsize": 16})
    packed = np.zeros((height, width), dtype=record)
    for i, axis in enumerate("xyz"):
        packed[axis] = cloud.points[..., i]
    c = cloud.colors.astype(np.uint32)
    packed["rgb"] = (c[..., 0] << 16) | (c[..., 1] << 8) | c[..., 2]
    rows = np.zeros((height, width * 16 + padding), np.uint8)
    rows[:, : width * 16] = packed.view(np.uint8).reshape(height, width * 16)
    fields = [SimpleNamespace(name=n, offset=o, datatype=7, count=1) for n, o in zip("x y z rgb".split(), (0, 4, 8, 12))]
    return SimpleNamespace(height=height, width=width, fields=fields, is_bigendian=big_endian, point_step=16,
                           row_step=width * 16 + padding, data=rows.tobytes(), is_dense=False,
                           header=SimpleNamespace(frame_id="camera_rgb_optical_frame"))


@pytest.mark.parametrize("big_endian,padding", [(False, 0), (True, 8)])
def test_pointcloud2_layout_decoding(pcd, big_endian, padding):
    part = PointCloud(pcd.points[200:260, 300:400], pcd.colors[200:260, 300:400])
    decoded = pointcloud2_to_cloud(_as_pointcloud2(part, big_endian, padding))
    assert decoded.organized and decoded.frame_id == "camera_rgb_optical_frame"
    assert np.array_equal(decoded.points, part.points, equal_nan=True)
    assert np.array_equal(decoded.colors, part.colors)


def test_pointcloud2_without_xyz_is_a_clear_error(pcd):
    msg = _as_pointcloud2(PointCloud(pcd.points[:2, :2], pcd.colors[:2, :2]), False, 0)
    msg.fields = msg.fields[1:]
    with pytest.raises(MmtkError, match="x"):
        pointcloud2_to_cloud(msg)


@needs_shared
@pytest.mark.parametrize("bag,step", [("pcl_kinect_3frames.bag", 2), ("pcl_kinect_3frames_ros2", 4)])
def test_bag_clouds_match_the_depth_frames(bag, step):
    tiff = SHARED / "pcl_kinect_grabber" / "tiff"
    frames = sorted(tiff.glob("*_depth.tiff"))
    clouds = list(read_bag_clouds(SHARED / "rosbag_pcl_kinect" / bag))
    assert [round(c.timestamp, 6) for c in clouds] == [1355494975.814212, 1355494976.068683, 1355494976.332395]
    for item, depth_path in zip(clouds, frames, strict=True):
        depth_m = np.array(Image.open(depth_path)).astype(np.float32) / 1000.0
        rgb = np.array(Image.open(str(depth_path).replace("_depth", "_rgb")))
        cloud = item.cloud
        assert item.topic == "/camera/depth_registered/points" and cloud.organized
        assert cloud.points.shape == (480 // step, 640 // step, 3)
        np.testing.assert_allclose(cloud_to_depth(cloud), depth_m[::step, ::step], rtol=0, atol=1e-6)
        assert np.array_equal(cloud.colors[cloud.valid], rgb[::step, ::step][cloud.valid])
        # Projected with the colour camera's K, the subsampled cloud lands on every step-th pixel.
        projected = cloud_to_depth(cloud, K, (480, 640))
        np.testing.assert_allclose(projected[::step, ::step], depth_m[::step, ::step], rtol=0, atol=1e-6)
        mask = np.ones_like(projected, dtype=bool)
        mask[::step, ::step] = False
        assert not projected[mask].any()
        np.testing.assert_array_equal(cloud_to_image_depth(cloud, (480, 640), K), projected)
        with pytest.raises(MmtkError, match="intrinsics"):
            cloud_to_image_depth(cloud, (480, 640))


@needs_shared
def test_bag_with_unknown_topic_is_a_clear_error():
    with pytest.raises(MmtkError, match="no PointCloud2 topic"):
        list(read_bag_clouds(SHARED / "rosbag_pcl_kinect" / "pcl_kinect_3frames.bag", topic="/nope"))


def test_import_mmtk_does_not_load_open3d():
    code = "import sys, mmtk, mmtk.pointcloud; assert 'open3d' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------ xyz modality

def test_xyz_prepared_from_depth_equals_from_organized_and_projected_cloud(pcd, depth_mm):
    from mmtk.adapters.xyz import prepare_xyz_from_cloud, prepare_xyz_from_depth

    from_depth, valid = prepare_xyz_from_depth(depth_mm / 1000.0, K)
    from_cloud, valid_cloud = prepare_xyz_from_cloud(pcd)
    projected, valid_projected = prepare_xyz_from_cloud(pcd.finite(), K, (480, 640))
    assert from_depth.shape == (3, 480, 640) and np.array_equal(valid[0].numpy(), depth_mm > 0)
    for other, other_valid in ((from_cloud, valid_cloud), (projected, valid_projected)):
        assert torch.equal(other_valid, valid)
        torch.testing.assert_close(other, from_depth, rtol=0, atol=1e-5)
    # One scale for all axes: the prepared x/z ratio is the metric one, z robustly centred.
    z = depth_mm[depth_mm > 0] / 1000.0
    low, high = np.quantile(z, [0.1, 0.9])
    scale = np.sqrt(z[(z >= low) & (z <= high)].var() + 1e-6)
    x_m = pcd.points[100, 600, 0]
    assert from_depth[0, 100, 600].item() == pytest.approx(x_m / scale, rel=1e-4)
    with pytest.raises(MmtkError, match="intrinsics"):
        prepare_xyz_from_cloud(pcd.finite())


def test_xyz_modality_pretrains_and_finetunes_without_core_changes(depth_mm, rgb):
    import mmtk
    from mmtk.adapters.xyz import flip_xyz, prepare_xyz_from_depth
    from mmtk.adapters.depth import prepare_depth
    from mmtk.adapters.rgb import prepare_rgb

    small = slice(96, 96 + 64), slice(160, 160 + 96)
    xyz, valid = prepare_xyz_from_depth(depth_mm[small] / 1000.0, intrinsics_matrix(525, 525, 320 - 160, 240 - 96))
    prepared = prepare_depth((depth_mm[small] / 1000.0).astype(np.float32), (64, 96), flip=False)
    depth, depth_valid = prepared["depth"], prepared["depth_valid"]
    batch = {"rgb": prepare_rgb(rgb[small], (64, 96), flip=False)[None], "xyz": xyz[None], "depth": depth[None]}
    torch.manual_seed(0)
    model = mmtk.create_model("multimae-tiny", verbose=False, dim=64, depth=2, num_heads=2, decoder_dim=32,
                              decoder_depth=1, decoder_heads=2, image_size=(64, 96), inputs=("rgb", "xyz"),
                              outputs=("rgb", "xyz", "depth"), num_visible=12)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        out = model(batch, valid={"xyz": valid[None], "depth": depth_valid[None]})
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.losses["xyz"].item())
    assert set(out.losses) == {"rgb", "xyz", "depth"} and out.masks["xyz"].shape == (1, 24)
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])  # it learns to reconstruct real geometry
    finetune = mmtk.create_model("multimae-tiny", verbose=False, dim=64, depth=4, num_heads=2, image_size=(64, 96),
                                 inputs=("rgb", "xyz"), main_inputs=("rgb", "xyz"), head="dpt", task="depth",
                                 hooks=(0, 1, 2, 3), layer_dims=(16, 32, 64, 64), dpt_dim=32)
    assert finetune({"rgb": batch["rgb"], "xyz": batch["xyz"]}).shape == (1, 1, 64, 96)
    flipped = flip_xyz(xyz)
    assert torch.equal(flipped[0], -xyz[0].flip(-1)) and torch.equal(flipped[1:], xyz[1:].flip(-1))
