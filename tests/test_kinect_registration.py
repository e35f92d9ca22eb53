"""Raw NYUv2 Kinect frames are registered: depth moves from the depth camera into the undistorted colour image.

Real data: ../shared/data/nyuv2_open3d_raw (one raw frame, NYU_color.ppm + NYU_depth.pgm, its README).
"""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from data_helpers import DecodedFile, run_cli, shared
from mmtk.data.sources.depth_encoding import DepthEncoding, read_depth
from mmtk.data.sources.nyuv2_meta import nyuv2_intrinsics
from mmtk.data.sources.image_files import read_rgb
from mmtk.data.sources.kinect_nyu import (KinectCalibration, NyuRegistration, distort, nyu_kinect_calibration,
                                          undistort)
from mmtk.data.sources.ros.tf import invert_rigid
from mmtk.errors import MmtkError
from mmtk.pointcloud import depth_to_xyz, intrinsics_matrix

RAW = "nyuv2_open3d_raw"


def raw_frame() -> tuple[np.ndarray, np.ndarray]:
    """The real raw frame: distorted colour uint8 and depth-camera metres (0 = invalid)."""
    src = shared(RAW)
    return read_rgb(src / "NYU_color.ppm"), read_depth(src / "NYU_depth.pgm", DepthEncoding("kinect-disparity"))


@pytest.fixture(scope="module")
def registered() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rgb, depth = raw_frame()
    out = NyuRegistration()({"rgb": rgb, "depth": depth}, "raw")
    return rgb, depth, out["rgb"], out["depth"]


def pinhole_pair(tx: float) -> KinectCalibration:
    """Two identical ideal 640x480 pinhole cameras, the colour one ``-tx`` metres along x of the depth one."""
    k = intrinsics_matrix(500.0, 500.0, 319.5, 239.5).astype(np.float64)
    motion = np.eye(4)
    motion[0, 3] = tx
    return KinectCalibration(k, k, (0.0,) * 5, (0.0,) * 5, motion)


# ------------------------------------------------------------------------------------------- the CLI
def test_convert_registers_the_real_raw_frame_into_the_colour_grid(tmp_path, registered):
    rgb, depth, _, _ = registered
    out = tmp_path / "raw.h5"
    code, text = run_cli("convert", "--rgbd", shared(RAW), out, "--no-progress")
    assert code == 0 and "registered to the colour image with the NYU Depth v2 toolbox calibration" in text, text
    with DecodedFile(out) as f:
        stored, stored_rgb, k = f["all/depth"][0], f["all/rgb"][0], f["all/intrinsics"][0]
    np.testing.assert_allclose(k, nyuv2_intrinsics())  # after registration depth lives in the RGB camera
    calib = nyu_kinect_calibration()
    assert 1.5 <= float(np.median(stored[stored > 0])) <= 6.3  # the sample README's range
    # Every RGB pixel spans (fx_d fy_d) / (fx_rgb fy_rgb) = 1.26 depth pixels: measured 0.810 of the raw valid
    # count survives against 0.794 expected from the focal lengths alone (the depth lens's barrel adds a little).
    area = calib.rgb_matrix[0, 0] * calib.rgb_matrix[1, 1] / (calib.depth_matrix[0, 0] * calib.depth_matrix[1, 1])
    survived = (stored > 0).sum() / (depth > 0).sum()
    assert survived == pytest.approx(area, rel=0.05)
    # Inside the footprint of the depth image no forward-projection holes appear: 6.2 % invalid, raw 7.2 %.
    rows, cols = np.flatnonzero((stored > 0).any(1)), np.flatnonzero((stored > 0).any(0))
    inner = stored[rows[0] + 5:rows[-1] - 5, cols[0] + 5:cols[-1] - 5]
    assert (inner == 0).mean() <= (depth == 0).mean() + 0.01
    # The colour is undistorted (it moved), and registration moved depth: few pixels keep the raw value.
    assert np.abs(stored_rgb.astype(int) - rgb).mean() > 5
    assert np.isclose(stored, depth, atol=1e-4)[stored > 0].mean() < 0.2


def test_color_and_depth_folders_of_ppm_and_pgm_pair_and_register(tmp_path, registered):
    src = tmp_path / "src"
    (src / "color").mkdir(parents=True)
    (src / "depth").mkdir()
    shutil.copy(shared(RAW) / "NYU_color.ppm", src / "color" / "0001.ppm")
    shutil.copy(shared(RAW) / "NYU_depth.pgm", src / "depth" / "0001.pgm")
    code, text = run_cli("convert", "--rgbd", src, tmp_path / "raw.h5", "--no-progress")
    assert code == 0 and "folders color/, depth/" in text and "registered to the colour image" in text, text
    with DecodedFile(tmp_path / "raw.h5") as f:
        np.testing.assert_array_equal(f["all/depth"][0], registered[3])


def test_raw_frames_of_another_size_or_beside_another_camera_file_are_refused_in_one_line(tmp_path):
    src = shared(RAW)
    small = tmp_path / "small"
    small.mkdir()
    Image.open(src / "NYU_color.ppm").crop((0, 0, 320, 240)).save(small / "NYU_color.png")
    disparity = np.frombuffer((src / "NYU_depth.pgm").read_bytes()[17:], "<u2").reshape(480, 640)
    Image.fromarray(np.ascontiguousarray(disparity[:240, :320])).save(small / "NYU_depth.pgm")
    code, text = run_cli("convert", "--rgbd", small, tmp_path / "small.h5", "--no-progress")
    line = text.split("error: ", 1)[1].strip()
    assert code == 2 and "\n" not in line and "640x480" in line and "rgb 320x240" in line, text
    assert not (tmp_path / "small.h5").exists()

    other = tmp_path / "other"
    shutil.copytree(src, other)
    (other / "intrinsics.txt").write_text("525 525 320 240\n")
    code, text = run_cli("convert", "--rgbd", other, tmp_path / "other.h5", "--no-progress")
    line = text.split("error: ", 1)[1].strip()
    assert code == 2 and "\n" not in line and "move intrinsics.txt away" in line, text


def test_labels_drawn_on_the_raw_colour_image_are_undistorted_with_it(tmp_path):
    src = shared(RAW)
    folder = tmp_path / "labelled"
    shutil.copytree(src, folder)
    labels = np.zeros((480, 640), np.uint8)
    labels[:, 320:] = 1
    labels[240:, :] += 2  # four quadrants, classes 1-3 and 0 = unlabeled
    Image.fromarray(labels).save(folder / "NYU_label.png")
    (folder / "classes.txt").write_text("right\nbottom\nbottom right\n")
    code, text = run_cli("convert", "--rgbd", folder, tmp_path / "l.h5", "--no-progress")
    assert code == 0, text
    with DecodedFile(tmp_path / "l.h5") as f:
        stored = f["all/semseg"][0]
    expected = NyuRegistration().undistort_image(labels, nearest=True, fill=0)
    np.testing.assert_array_equal(stored, expected)
    assert set(np.unique(stored)) == {0, 1, 2, 3}  # nearest neighbour: no blended class ids
    assert not np.array_equal(stored, labels)


def test_labels_of_a_float_image_are_refused_in_one_line_as_without_registration(tmp_path):
    folder = tmp_path / "float_labels"
    shutil.copytree(shared(RAW), folder)
    Image.fromarray(np.ones((480, 640), np.float32)).save(folder / "NYU_label.tif")
    (folder / "classes.txt").write_text("wall\nfloor\n")
    code, text = run_cli("convert", "--rgbd", folder, tmp_path / "f.h5", "--no-progress")
    line = text.split("error: ", 1)[1].strip()
    assert code == 2 and "\n" not in line and "semseg has dtype float32" in line, text
    assert not (tmp_path / "f.h5").exists()


# ------------------------------------------------------------------------------ geometry, synthetic
def test_a_fronto_parallel_patch_shifts_by_fx_tx_over_z_and_the_nearest_surface_wins():
    depth = np.full((480, 640), 3.0, np.float32)
    depth[200:280, 300:340] = 1.0  # a box 1 m away in front of a wall 3 m away
    out = NyuRegistration(pinhole_pair(-0.03)).register_depth(depth)
    # u_rgb = u_d + fx tx / z: the box moves 500 * -0.03 / 1 = -15 px, the wall -5 px
    np.testing.assert_array_equal(out[200:280, 285:325], 1.0)  # the box wins where the wall lands too
    assert (out[200:280, 325:335] == 0).all()  # wall the depth camera could not see behind the box: no depth
    np.testing.assert_array_equal(out[200:280, 335:635], 3.0)
    np.testing.assert_array_equal(out[:200, :635], 3.0)  # a constant z for the plane
    assert (out[:, 635:] == 0).all()  # beyond the depth camera's view


def test_the_nyu_calibration_shifts_near_depth_by_fx_rgb_tx_over_z():
    reg = NyuRegistration()
    calib = reg.calibration
    columns = {}
    for z in (1.0, 4.0):
        depth = np.zeros((480, 640), np.float32)
        depth[230:250, 300:340] = z
        out = reg.register_depth(depth)
        assert np.abs(out[out > 0] - z).max() < 0.005  # the colour camera sees the patch at z (rotation: mm)
        columns[z] = np.flatnonzero(out.any(0)).mean()
    tx = -calib.depth_to_rgb[0, 3]  # 2.5 cm: the colour camera sits that far along the depth camera's +x
    assert tx == pytest.approx(0.025, abs=0.001)
    expected = calib.rgb_matrix[0, 0] * tx * (1 / 1.0 - 1 / 4.0)  # 9.74 px: nearer points move left
    assert columns[4.0] - columns[1.0] == pytest.approx(expected, abs=0.5)


def test_undistortion_inverts_the_lens_model_and_moves_a_corner_feature_where_it_says():
    calib = nyu_kinect_calibration()
    v, u = np.mgrid[0:480, 0:640].astype(np.float64)
    for k, kc in ((calib.rgb_matrix, calib.rgb_distortion), (calib.depth_matrix, calib.depth_distortion)):
        xd, yd = (u - k[0, 2]) / k[0, 0], (v - k[1, 2]) / k[1, 1]
        x, y = undistort(xd, yd, kc)
        back = distort(x, y, kc)
        assert np.abs(back[0] - xd).max() * k[0, 0] < 1e-6 and np.abs(back[1] - yd).max() * k[1, 1] < 1e-6
        assert np.abs(x - xd).max() * k[0, 0] > 5  # the lenses move corner pixels by > 5 px (7.3 and 7.4)
    # A bright dot at a distorted pixel near a corner appears where the inverse model puts it.
    k = calib.rgb_matrix
    image = np.zeros((480, 640, 3), np.uint8)
    image[58:63, 78:83] = 255  # centred on (80, 60) px, 50 px inside the white border the undistortion adds
    out = NyuRegistration(calib).undistort_image(image)[30:90, 50:110, 0]
    x, y = undistort(np.array([(80 - k[0, 2]) / k[0, 0]]), np.array([(60 - k[1, 2]) / k[1, 1]]), calib.rgb_distortion)
    expected = (y[0] * k[1, 1] + k[1, 2] - 30, x[0] * k[0, 0] + k[0, 2] - 50)
    assert np.hypot(expected[0] - 30, expected[1] - 30) > 3  # the dot moves by more than 3 px
    assert ndimage.center_of_mass(out.astype(np.float64)) == pytest.approx(expected, abs=0.3)


# ------------------------------------------------------------------------------------ the real frame
def test_registered_depth_back_projects_onto_the_raw_pixels_with_the_raw_depth(registered):
    """Round trip: registered depth -> 3D with the RGB intrinsics -> the depth camera -> its lens and pixels."""
    _, depth, _, out = registered
    calib = nyu_kinect_calibration()
    points = depth_to_xyz(out, calib.rgb_matrix)[out > 0].astype(np.float64)
    back = points @ invert_rigid(calib.depth_to_rgb)[:3, :3].T + invert_rigid(calib.depth_to_rgb)[:3, 3]
    k = calib.depth_matrix
    xd, yd = distort(back[:, 0] / back[:, 2], back[:, 1] / back[:, 2], calib.depth_distortion)
    u, v = xd * k[0, 0] + k[0, 2], yd * k[1, 1] + k[1, 2]
    # The point was projected from a raw pixel and rounded to the RGB grid: it lies within 0.5 RGB px =
    # 0.56 depth px per axis of that raw pixel, whose raw depth is its z in the depth camera (to float32).
    ui, vi = np.rint(u).astype(int), np.rint(v).astype(int)
    best = np.full(len(u), np.inf)
    for du in (-1, 0, 1):
        for dv in (-1, 0, 1):
            uu, vv = np.clip(ui + du, 0, 639), np.clip(vi + dv, 0, 479)
            near = (np.abs(uu - u) <= 0.57) & (np.abs(vv - v) <= 0.57)
            best = np.where(near, np.minimum(best, np.abs(depth[vv, uu] - back[:, 2])), best)
    assert len(best) > 200_000 and np.all(best < 1e-3)  # every registered pixel: a raw pixel within 1 mm


def test_depth_edges_meet_colour_edges_after_registration(registered):
    """Fraction of strong depth discontinuities (> 10 % between neighbours) within 2 px of a strong colour edge
    (Sobel magnitude above its 90th percentile). Measured: raw pairing 0.43, registered 0.72, registered with the
    translation reversed 0.52 (so the side the colour camera sits on is right, not only the scaling)."""
    rgb, depth, rgb_out, out = registered
    calib = nyu_kinect_calibration()
    motion = calib.depth_to_rgb.copy()
    motion[:3, 3] *= -1
    flipped = NyuRegistration(dataclasses.replace(calib, depth_to_rgb=motion))({"rgb": rgb, "depth": depth}, "")
    before, after = edge_alignment(rgb, depth), edge_alignment(rgb_out, out)
    reversed_t = edge_alignment(flipped["rgb"], flipped["depth"])
    assert before < 0.5 and after > 0.65 and after - reversed_t > 0.1, (before, after, reversed_t)


def edge_alignment(rgb: np.ndarray, depth: np.ndarray) -> float:
    jumps = np.zeros(depth.shape, bool)
    for a, b, at in ((depth[:-1], depth[1:], jumps[:-1]), (depth[:, :-1], depth[:, 1:], jumps[:, :-1])):
        at |= (a > 0) & (b > 0) & (np.abs(a - b) > 0.1 * np.minimum(a, b))
    grey = rgb.astype(np.float32).mean(-1)
    magnitude = np.hypot(ndimage.sobel(grey, 0), ndimage.sobel(grey, 1))
    distance = ndimage.distance_transform_edt(magnitude <= np.percentile(magnitude, 90))
    return float((distance[jumps] <= 2).mean())


# ---------------------------------------------------------------------------- the raw dump layout
def raw_dump(folder, colour_time: float, depth_times: tuple[float, ...]) -> None:
    """A scene folder as the NYUv2 raw release has it, made of the real frame: r-TIME-N.ppm, d-TIME-N.pgm,
    an accelerometer a-TIME-N.dump and INDEX.txt."""
    src = shared(RAW)
    folder.mkdir(parents=True)
    shutil.copy(src / "NYU_color.ppm", folder / f"r-{colour_time:.6f}-2857868057.ppm")
    for number, t in enumerate(depth_times):
        shutil.copy(src / "NYU_depth.pgm", folder / f"d-{t:.6f}-{2858826299 + number}.pgm")
    (folder / f"a-{colour_time:.6f}-2857868000.dump").write_bytes(b"\0" * 16)
    (folder / "INDEX.txt").write_text("\n".join(p.name for p in sorted(folder.iterdir())))


def test_raw_dumps_pair_each_depth_frame_with_the_nearest_colour_frame_and_register_it(tmp_path, registered):
    _, _, rgb_out, depth_out = registered
    scene = tmp_path / "basement_0001a"
    raw_dump(scene, 1294439283.377657, (1294439283.392217, 1294439283.512217))  # 15 ms and 135 ms away
    code, text = run_cli("convert", "--rgbd", scene, tmp_path / "one.h5", "--no-progress")
    assert code == 0 and "layout: nyuv2-raw" in text and "registered to the colour image" in text, text
    assert "skipped 1 depth frames in basement_0001a/ without a colour frame within 33 ms" in text
    with DecodedFile(tmp_path / "one.h5") as f:
        np.testing.assert_array_equal(f["all/depth"][0], depth_out)
        np.testing.assert_array_equal(f["all/rgb"][0], rgb_out)
        np.testing.assert_allclose(f["all/intrinsics"][0], nyuv2_intrinsics())
        assert f["all/timestamp"][0] == pytest.approx(1294439283.392217, abs=1e-6)  # the depth frame's time
        assert f["all/frame_id"][0].decode() == "d-1294439283.392217-2858826299.pgm"

    raw_dump(tmp_path / "scenes" / "bedroom_0001", 10.0, (10.01,))
    raw_dump(tmp_path / "scenes" / "kitchen_0002", 20.0, (19.99,))
    code, text = run_cli("convert", "--rgbd", tmp_path / "scenes", tmp_path / "two.h5", "--no-progress")
    assert code == 0 and "2 raw Kinect dump(s)" in text, text
    with DecodedFile(tmp_path / "two.h5") as f:
        assert [i.decode() for i in f["all/frame_id"][()]] == ["bedroom_0001/d-10.010000-2858826299.pgm",
                                                              "kitchen_0002/d-19.990000-2858826299.pgm"]

    code, text = run_cli("convert", "--rgbd", scene, tmp_path / "mm.h5", "--no-progress", "--depth-format", "mm")
    line = text.split("error: ", 1)[1].strip()
    assert code == 2 and "\n" not in line and "raw Kinect disparity" in line and not (tmp_path / "mm.h5").exists()


def test_a_frame_without_rgb_or_depth_is_refused_in_one_line():
    depth = np.full((480, 640), 2.0, np.float32)
    with pytest.raises(MmtkError, match=r"^f\.pgm: .* has no rgb; ") as raised:
        NyuRegistration()({"depth": depth}, "f.pgm")
    assert "\n" not in str(raised.value)


def test_a_raw_dump_whose_depth_frames_all_lack_a_colour_frame_is_refused_in_one_line(tmp_path):
    scene = tmp_path / "office_0001"
    raw_dump(scene, 10.0, (10.5, 11.0))  # 500 and 1000 ms from the only colour frame
    code, text = run_cli("convert", "--rgbd", scene, tmp_path / "far.h5", "--no-progress")
    line = text.split("error: ", 1)[1].strip()
    assert code == 2 and "\n" not in line and "no depth frame has a colour frame within 33 ms" in line, text
    assert not (tmp_path / "far.h5").exists()


def test_a_raw_dump_beside_another_camera_file_is_refused_in_one_line(tmp_path):
    scene = tmp_path / "study_0001"
    raw_dump(scene, 10.0, (10.01,))
    (scene / "camera_intrinsics.txt").write_text("525 525 320 240\n")
    code, text = run_cli("convert", "--rgbd", scene, tmp_path / "cam.h5", "--no-progress")
    line = text.split("error: ", 1)[1].strip()
    assert code == 2 and "\n" not in line and "move camera_intrinsics.txt away" in line, text
    assert not (tmp_path / "cam.h5").exists()
