"""Hostile files (issue 10 items 1 and 5, issue 20 items 1-3, 5, 10, 11): depth units are read or refused, layouts
never guess silently, bags pair by stamp in any order,
and values inside mmtk files are checked where they are used. Plus a fuzz test over recipe values."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from data_helpers import MULTIMAE, SYNC, TUM, DecodedFile, labeled_frame, run_cli, shared
from mmtk.data.sources.kinect_nyu import NyuRegistration
from mmtk.errors import MmtkError

INDOOR = (0.2, 12.0)
REAL_FOLDERS = ["esanet_kinect2_sample", "nyuv2_metric3d_sync", "nyuv2_open3d_raw", "nyuv2_rcnn_depth_crop",
                "nyuv2_sagate_labeled", "pcl_kinect_grabber", "sun_open3d", "tum_rgbd_open3d"]


def convert(src, out, *extra) -> tuple[int, str]:
    return run_cli("convert", "--rgbd", src, out, "--no-progress", *extra)


def refusal(code: int, text: str) -> str:
    """The one error line of a refused command (no traceback, nothing else after it)."""
    assert code == 2 and "Traceback" not in text, text
    line = text.split("error: ", 1)[1].rstrip("\n")
    assert "\n" not in line, line
    return line


def median_depth(path) -> float:
    with DecodedFile(path) as f:
        values = np.concatenate([f[f"{split}/depth"][()].ravel() for split in f])
    return float(np.median(values[values > 0]))


# ------------------------------------------------------------------------------------------ item 1: units
@pytest.mark.parametrize("folder", REAL_FOLDERS)
def test_reliability_every_real_sample_converts_to_plausible_metres_or_refuses_in_one_line(tmp_path, folder):
    out = tmp_path / "out.h5"
    code, text = convert(shared(folder), out)
    if code == 0:
        assert INDOOR[0] <= median_depth(out) <= INDOOR[1], text
    else:
        line = refusal(code, text)
        assert "--depth-format" in line and "--depth-scale" in line and not out.exists()


def test_reliability_known_encodings_are_read_not_guessed(tmp_path):
    """SUN's bit rotation, raw Kinect disparity, TUM's 5000/m and PCL's XML units give the READMEs' numbers."""
    sun = shared("sun_open3d")
    assert convert(sun, tmp_path / "sun.h5")[0] == 0
    v = np.array(Image.open(sun / "SUN_depth.png")).astype(np.int64)
    expected = (((v >> 3) | (v << 13)) & 0xFFFF) / 1000.0  # SUN RGB-D toolbox read3dPoints
    with DecodedFile(tmp_path / "sun.h5") as f:
        np.testing.assert_allclose(f["all/depth"][0], expected, rtol=1e-6)
    p01, p99 = np.percentile(expected[expected > 0], [1, 99])
    assert p01 == pytest.approx(1.10, abs=0.01) and p99 == pytest.approx(8.85, abs=0.01)  # the README's range

    raw = shared("nyuv2_open3d_raw")
    code, text = convert(raw, tmp_path / "nyu.h5")
    assert code == 0 and "raw Kinect v1 disparity" in text and "registered to the colour image" in text
    d = np.frombuffer((raw / "NYU_depth.pgm").read_bytes()[17:], "<u2").reshape(480, 640).astype(np.float64)
    metres = np.where(d < 2047, 351.3 / (1092.5 - d), 0.0)  # the README's (and NYU toolbox's) model
    with DecodedFile(tmp_path / "nyu.h5") as f:
        depth = f["all/depth"][0]
    # stored in the colour camera's grid (tests/test_kinect_registration.py checks the registration itself); a
    # float32 ulp of difference may move a point across a pixel border (1 pixel of 307200 here)
    expected = NyuRegistration().register_depth(np.where(metres <= 10, metres, 0).astype(np.float32))
    assert np.isclose(depth, expected, rtol=1e-5).mean() > 0.9999

    pcl = shared("pcl_kinect_grabber")
    code, text = convert(pcl, tmp_path / "pcl.h5")
    assert code == 0 and "1000 units/m, declared by intrinsics_frame_20121214T142255.814212.xml" in text
    with DecodedFile(tmp_path / "pcl.h5") as f:
        k = f["all/intrinsics"][0]
    np.testing.assert_allclose(k, [[525, 0, 320], [0, 525, 240], [0, 0, 1]])


def test_reliability_kinect_v2_tenths_of_mm_read_by_size_and_range(tmp_path):
    src = shared("esanet_kinect2_sample")
    code, text = convert(src, tmp_path / "k2.h5")
    assert code == 0 and "512x424 is Kinect v2's depth size and millimetres would give a median of 24.5 m" in text
    assert median_depth(tmp_path / "k2.h5") == pytest.approx(2.45, abs=0.01)  # ESANet's README
    assert convert(src, tmp_path / "mm.h5", "--depth-format", "mm", "--depth-range", "lidar")[0] == 0
    assert median_depth(tmp_path / "mm.h5") == pytest.approx(24.48, abs=0.01)


def test_reliability_depth_range_flag(tmp_path):
    src = tmp_path / "frames"  # TUM's frame without a name saying so: millimetres give 7-47 m
    src.mkdir()
    shutil.copy(TUM / "TUM_color.png", src / "a_color.png")
    shutil.copy(TUM / "TUM_depth.png", src / "a_depth.png")
    assert "outside the sensor range 0.2-12 m" in refusal(*convert(src, tmp_path / "x.h5"))
    assert convert(src, tmp_path / "out.h5", "--depth-range", "outdoor")[0] == 0
    assert "outside the sensor range 1-5 m" in refusal(*convert(src, tmp_path / "x.h5", "--depth-range", "1-5"))
    assert "--depth-range '5-1'" in refusal(*convert(src, tmp_path / "x.h5", "--depth-range", "5-1"))
    assert "pass only one" in refusal(*convert(src, tmp_path / "x.h5", "--depth-format", "mm", "--depth-scale", "1"))
    assert "--depth-format 'cm' is unknown" in refusal(*convert(src, tmp_path / "x.h5", "--depth-format", "cm"))


def test_reliability_kinect_disparity_in_either_byte_order(tmp_path):
    from mmtk.data.sources.depth_encoding import DepthEncoding, decode_depth

    disparity = np.array([[839, 1000], [2047, 700]], np.uint16)
    expected = decode_depth(disparity, DepthEncoding("kinect-disparity"), "le")
    np.testing.assert_array_equal(decode_depth(disparity.byteswap(), DepthEncoding("kinect-disparity"), "be"), expected)
    assert expected[1, 0] == 0 and expected[0, 0] == pytest.approx(351.3 / (1092.5 - 839))
    with pytest.raises(MmtkError, match="not raw Kinect disparity"):
        decode_depth(np.array([[3000, 4000]], np.uint16), DepthEncoding("kinect-disparity"), "mm")


def _frames_folder(root, name: str, labels: bool = True):
    """rgb/, depth/ (uint16 mm, real NYUv2 sync frame) and label/ with the same file names."""
    rgb, _, label = labeled_frame()
    for folder in ("rgb", "depth") + (("label",) if labels else ()):
        (root / folder).mkdir(parents=True)
    Image.fromarray(rgb).save(root / "rgb" / f"{name}.png")
    shutil.copy(SYNC / "depth" / "sync_depth_00000.png", root / "depth" / f"{name}.png")
    if labels:
        Image.fromarray(label).save(root / "label" / f"{name}.png")


@pytest.mark.parametrize("name", ["0000", "f0000"])
def test_reliability_numbered_frames_with_labels_are_not_taken_for_tum(tmp_path, name):
    src = tmp_path / "frames"
    _frames_folder(src, name)
    code, text = convert(src, tmp_path / "out.h5")
    assert code == 0 and "layout: paired" in text and "rgb/, depth/, label/" in text
    mm = np.array(Image.open(SYNC / "depth" / "sync_depth_00000.png"))
    with DecodedFile(tmp_path / "out.h5") as f:
        np.testing.assert_allclose(f["all/depth"][0], mm / 1000.0, rtol=1e-6)  # 0.71-8.27 m, not 1/5000
        np.testing.assert_array_equal(f["all/semseg"][0], labeled_frame()[2])


def test_reliability_ambiguous_layout_lists_candidates_and_layout_picks(tmp_path):
    src = tmp_path / "both"  # TUM names (Unix time) that are also identical in rgb/ and depth/: tum and paired
    (src / "rgb").mkdir(parents=True)
    (src / "depth").mkdir()
    shutil.copy(TUM / "TUM_color.png", src / "rgb" / "1305031102.175304.png")
    shutil.copy(TUM / "TUM_depth.png", src / "depth" / "1305031102.175304.png")
    code, text = convert(src, tmp_path / "out.h5")
    assert code == 2 and "Traceback" not in text and not (tmp_path / "out.h5").exists()
    message = text.split("error: ", 1)[1].strip().splitlines()
    assert "matches 2 layouts; pick one with --layout NAME" in message[0]
    assert [line.split(":")[0].strip() for line in message[1:]] == ["tum", "paired"]
    code, text = convert(src, tmp_path / "out.h5", "--layout", "tum")
    assert code == 0 and "layout evidence: rgb/ and depth/ named by Unix time" in text
    assert median_depth(tmp_path / "out.h5") == pytest.approx(2.415, abs=0.01)
    assert "does not hold that layout" in refusal(*convert(src, tmp_path / "x.h5", "--layout", "multimae"))


def test_reliability_labels_beside_a_layout_without_labels_are_reported(tmp_path):
    src = tmp_path / "tum"
    (src / "rgb").mkdir(parents=True)
    (src / "depth").mkdir()
    (src / "labels").mkdir()
    shutil.copy(TUM / "TUM_color.png", src / "rgb" / "1305031102.175304.png")
    shutil.copy(TUM / "TUM_depth.png", src / "depth" / "1305031102.185000.png")
    code, text = convert(src, tmp_path / "out.h5")
    assert code == 0 and "NOT converted: labels in labels/" in text


def test_reliability_metres_read_as_millimetres_refused(tmp_path):
    src = tmp_path / "m"
    _frames_folder(src, "0000", labels=False)
    mm = np.array(Image.open(SYNC / "depth" / "sync_depth_00000.png"))
    Image.fromarray((mm // 1000).astype(np.uint16)).save(src / "depth" / "0000.png")  # whole metres as uint16
    line = refusal(*convert(src, tmp_path / "out.h5"))
    assert "implausibly close" in line and "--depth-scale" in line and not (tmp_path / "out.h5").exists()


def test_reliability_intrinsics_files_json_and_text(tmp_path):
    from mmtk.data.sources.intrinsics import find_intrinsics, read_intrinsics_file

    k = np.array([[517.3, 0, 318.6], [0, 516.5, 255.3], [0, 0, 1]], np.float32)
    (tmp_path / "open3d.json").write_text(json.dumps(
        {"width": 640, "height": 480, "intrinsic_matrix": k.T.ravel().tolist()}))  # Open3D: column-major
    (tmp_path / "fx.json").write_text(json.dumps({"intrinsics": {"fx": 517.3, "fy": 516.5, "cx": 318.6, "cy": 255.3}}))
    (tmp_path / "camera.txt").write_text("# fx fy cx cy d0 d1 d2 d3 d4 (TUM fr1)\n517.3 516.5 318.6 255.3 0.26 -0.95\n")
    for name in ("open3d.json", "fx.json", "camera.txt"):
        np.testing.assert_allclose(read_intrinsics_file(tmp_path / name).matrix, k, rtol=1e-6)
    assert read_intrinsics_file(tmp_path / "open3d.json").size == (480, 640)
    (tmp_path / "calib.json").write_text("{not json")
    with pytest.raises(MmtkError, match="cannot read intrinsics"):
        find_intrinsics(tmp_path)


# ----------------------------------------------------------------------------- item 5: values in mmtk files
@pytest.fixture()
def mmtk_file(tmp_path):
    """The MultiMAE sample converted with depth as float32 metres (as a float source stores it), where a bad value
    can be written (its PNG's integers would be stored as integers, which cannot be NaN)."""
    from mmtk.data.codecs import plain
    from mmtk.data.convert import write_frames
    from mmtk.data.sources.folders import open_rgbd_source

    out = tmp_path / "mm.h5"
    source = open_rgbd_source(MULTIMAE)
    frames = (dataclasses.replace(f, arrays={k: plain(v) for k, v in f.arrays.items()}) for f in source.frames())
    write_frames(frames, out, source="test", total=source.total, classes=source.classes, progress=False)
    return out


def _edit(path, key: str, change) -> None:
    with h5py.File(path, "r+") as f:
        value = f[key][0]
        change(value)
        f[key][0] = value


@pytest.mark.parametrize("key, change, message", [
    ("test/depth", lambda d: d.__setitem__((10, 10), np.nan), "non-finite"),
    ("test/depth", lambda d: d.__setitem__((10, 10), 1e30), "outside 0-1000 m"),
    ("train/semseg", lambda s: s.__setitem__((5, 5), 200), "class id 200, beyond the file's 40 classes"),
])
def test_reliability_loader_refuses_bad_values_naming_file_split_frame(mmtk_file, key, change, message):
    from mmtk.data import H5Dataset

    _edit(mmtk_file, key, change)
    split = key.split("/")[0]
    with pytest.raises(MmtkError, match=message) as err:
        H5Dataset(mmtk_file, split, image_size=(64, 64))[0]
    assert str(err.value).startswith(f"{mmtk_file}:{split} frame 0: ") and "\n" not in str(err.value)
    code, text = run_cli("check", mmtk_file)
    assert code == 1 and f"{mmtk_file}:{split} frame 0 " in text and message in text
    assert "2 frames checked, 1 bad" in text


def test_reliability_check_reads_pseudo_labels_as_the_labels_their_classes_name(mmtk_file):
    """semseg_pseudo is no adapter's array (recipes map semseg to it): its classes attribute makes it labels."""
    labels = np.zeros((1, 240, 320), np.uint8)
    labels[0, 5, 5] = 4  # the third of two classes + unlabeled
    with h5py.File(mmtk_file, "r+") as f:
        f["test/semseg_pseudo"] = np.concatenate([labels, np.zeros_like(labels)])
        f["test/semseg_pseudo"].attrs["classes"] = '["floor", "wall"]'
    code, text = run_cli("check", mmtk_file)
    assert code == 1 and f"{mmtk_file}:test frame 0 (" in text and "semseg_pseudo holds class id 4" in text
    assert "1 bad" in text


def test_reliability_flipped_bytes_fail_their_checksum(mmtk_file):
    from mmtk.data import H5Dataset

    assert run_cli("check", mmtk_file) == (0, f"{mmtk_file}: 2 frames checked, 0 bad\n")
    with DecodedFile(mmtk_file) as f:
        offset = f["train/depth"].id.get_chunk_info(0).byte_offset
    with open(mmtk_file, "r+b") as handle:
        handle.seek(offset + 1000)
        byte = handle.read(1)[0]
        handle.seek(offset + 1000)
        handle.write(bytes([byte ^ 0x10]))
    with pytest.raises(MmtkError, match="frame 0 cannot be read: damaged data or checksum mismatch"):
        H5Dataset(mmtk_file, "train", image_size=(64, 64))[0]
    code, text = run_cli("check", mmtk_file)
    assert code == 1 and "frame 0 (train/rgb/data/0000.png): depth: cannot be read" in text


def test_reliability_convert_refuses_absurd_depth_before_writing(tmp_path):
    from mmtk.data.format import H5Writer

    rgb, depth, _ = labeled_frame()
    depth[0, 0] = 1e30
    out = tmp_path / "bad.h5"
    with pytest.raises(MmtkError, match=r"beyond any depth sensor \(> 1000 m\)"):
        with H5Writer(out, source="test") as writer:
            writer.add_frame("train", {"rgb": rgb, "depth": depth})
    assert not out.exists()


# ------------------------------------------------------------------------------------------ fuzz: recipes
_FIELDS = ["kind", "data", "model", "optim", "train", "path", "image_size", "num_classes", "crop_scale", "hflip",
           "repeat", "sources", "inputs", "outputs", "num_visible", "head", "task", "overrides", "batch_size", "lr",
           "epochs", "warmup_epochs", "layer_decay", "betas", "accum_steps", "micro_batch", "clip_grad", "seed",
           "max_steps", "log_every", "ckpt_every", "keep_checkpoints", "precision"]
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                     st.text(max_size=12), st.sampled_from(["rgb,depth", "1e-4", "nan", "inf", "a\x00b", "x" * 300]))
_VALUES = st.recursive(_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                       st.dictionaries(st.one_of(st.sampled_from(_FIELDS), st.text(max_size=6), st.integers()),
                                       inner, max_size=4)), max_leaves=12)
_SECTIONS = st.dictionaries(st.sampled_from(["data", "model", "optim", "train"]),
                            st.dictionaries(st.sampled_from(_FIELDS), _VALUES, max_size=4), max_size=4)
_RECIPES = st.one_of(_SECTIONS, st.dictionaries(st.one_of(st.sampled_from(_FIELDS), st.text(max_size=6)), _VALUES,
                                                max_size=5))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=_RECIPES, overrides=st.lists(st.text(max_size=20), max_size=3))
@example(values={"data": {"path": "x" * 300}}, overrides=[])  # a name too long for the file system
@example(values={"optim": {"lr": "nan", "epochs": float("inf")}}, overrides=["optim.batch_size=.nan"])
def test_reliability_fuzz_recipe_values_give_a_recipe_or_mmtk_error(tmp_path_factory, values, overrides):
    import yaml

    from mmtk.config import Recipe, load_recipe, recipe_from_dict

    for attempt in (lambda: recipe_from_dict(values),
                    lambda: load_recipe(_yaml(tmp_path_factory, yaml.safe_dump(values)), overrides)):
        try:
            recipe = attempt()
        except MmtkError as err:
            assert str(err)
        else:
            assert isinstance(recipe, Recipe)
            assert 0 < recipe.optim.lr < float("inf") and 0 < recipe.optim.epochs < float("inf")


def _yaml(factory, text: str):
    path = factory.getbasetemp() / "fuzz_recipe.yaml"
    path.write_text(text)
    return path


def test_reliability_bad_value_in_a_dataloader_worker_is_still_one_line(mmtk_file):
    import torch

    from mmtk.data import H5Dataset

    _edit(mmtk_file, "test/depth", lambda d: d.__setitem__((1, 1), np.nan))
    loader = torch.utils.data.DataLoader(H5Dataset(mmtk_file, "test", image_size=(64, 64)), num_workers=1)
    with pytest.raises(MmtkError) as err:
        next(iter(loader))
    assert str(err.value).startswith(f"{mmtk_file}:test frame 0: depth has 1 non-finite") and "\n" not in str(err.value)


def test_reliability_frames_without_labels_are_reported_when_labels_exist(tmp_path):
    src = tmp_path / "frames"
    _frames_folder(src, "0000")
    shutil.copy(src / "rgb" / "0000.png", src / "rgb" / "0001.png")
    shutil.copy(src / "depth" / "0000.png", src / "depth" / "0001.png")
    code, text = convert(src, tmp_path / "out.h5")
    assert code == 0 and "skipped 1 colour/depth pairs without a label: 0001.png" in text


def test_reliability_pretrain_on_labels_beyond_the_classes_stops_in_one_line(tmp_path):
    from engine_helpers import RECIPES, TINY

    data = tmp_path / "bad_labels.h5"
    code, text = convert(MULTIMAE, data, "--size", "120x160")
    assert code == 0, text
    _edit(data, "train/semseg", lambda s: s.__setitem__(Ellipsis, 200))  # every crop sees it
    args = [f"--set={s}" for s in TINY + ["optim.batch_size=2", "train.max_steps=1"]]
    code, output = run_cli("pretrain", RECIPES / "tiny.yaml", "--data", data, "--out", tmp_path / "run", *args)
    line = refusal(code, output)
    assert line.startswith(f"{data}:train frame 0: semseg holds class id 200, beyond the file's 40 classes")


def test_reliability_rgbd_flags_are_refused_for_other_sources(tmp_path):
    line = refusal(*run_cli("convert", "--images", SYNC / "rgb", tmp_path / "x.h5", "--depth-format", "mm"))
    assert "--depth-format only apply to --rgbd folders" in line and not (tmp_path / "x.h5").exists()


def test_reliability_check_reports_declared_frames_the_file_does_not_hold(mmtk_file):
    with h5py.File(mmtk_file, "r+") as f:
        f["train/depth"].resize(2**40, axis=0)  # declared, never written: must not be read or allocated
    code, text = run_cli("check", mmtk_file)  # refused when the file is opened, from its metadata alone
    assert code == 2 and "/train/depth declares 1099511627776 frames but the file stores 1" in text



def test_reliability_check_lists_frames_declared_within_the_file_s_means_but_never_written(mmtk_file):
    with h5py.File(mmtk_file, "r+") as f:
        f["train/depth"].resize(3, axis=0)  # 2 frames more than written: plausible, so the file opens
    code, text = run_cli("check", mmtk_file)
    assert code == 1 and f"{mmtk_file}:train frame 1: depth: declares 3 frames but the file holds 1; the rest " \
        f"were never written" in text and "2 frames checked, 1 bad" in text

def test_reliability_input_hdf5_declaring_absurd_sizes_is_refused_before_reading(tmp_path):
    """NYUv2's .mat and sparse-to-dense .h5 inputs are HDF5 too: a few KB may declare any shape."""
    mat = tmp_path / "nyu" / "nyu_depth_v2_labeled.mat"
    mat.parent.mkdir()
    with h5py.File(mat, "w") as f:
        f.create_dataset("images", shape=(1449, 3, 640, 480), dtype=np.uint8, chunks=(1, 3, 640, 480))
        f.create_dataset("depths", shape=(1449, 640, 480), dtype=np.float32, chunks=(1, 640, 480))
    line = refusal(*convert(mat.parent, tmp_path / "a.h5"))
    assert "nyu_depth_v2_labeled.mat:images declares" in line and "download the file again" in line
    folder = tmp_path / "s2d" / "train"
    folder.mkdir(parents=True)
    with h5py.File(folder / "00001.h5", "w") as f:
        f.create_dataset("rgb", shape=(3, 16384, 16384), dtype=np.uint8, chunks=(1, 128, 128))
        f.create_dataset("depth", shape=(16384, 16384), dtype=np.float32, chunks=(128, 128))
    line = refusal(*convert(folder.parent, tmp_path / "b.h5", "--layout", "sparse-to-dense"))
    assert "00001.h5:rgb declares" in line and "re-export the file" in line


# ------------------------------------------- issue 20: hostile bags, folders and files (items 1-3, 5, 10, 11)
SIDE = 16  # px of the synthetic bag frames


def _bag_types():
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_HUMBLE)
    return store, store.types


def _header(types, ns: int):
    return types["std_msgs/msg/Header"](stamp=types["builtin_interfaces/msg/Time"](sec=ns // 10**9,
                                                                                    nanosec=ns % 10**9),
                                        frame_id="camera")


def colour_msg(types, ns: int, value: int):
    pixels = np.full((SIDE, SIDE, 3), value, np.uint8).reshape(-1)
    return types["sensor_msgs/msg/Image"](_header(types, ns), SIDE, SIDE, "rgb8", 0, 3 * SIDE, pixels)


def jpeg_msg(types, ns: int, payload: bytes):
    return types["sensor_msgs/msg/CompressedImage"](_header(types, ns), "rgb8; jpeg compressed bgr8",
                                                    np.frombuffer(payload, np.uint8))


def depth_msg(types, ns: int, mm: int):
    values = np.full((SIDE, SIDE), mm, "<u2").view(np.uint8).reshape(-1)
    return types["sensor_msgs/msg/Image"](_header(types, ns), SIDE, SIDE, "16UC1", 0, 2 * SIDE, values)


def info_msg(types, ns: int, k: list[float]):
    return types["sensor_msgs/msg/CameraInfo"](_header(types, ns), SIDE, SIDE, "plumb_bob", np.zeros(5),
                                               np.asarray(k, np.float64), np.eye(3).reshape(-1), np.zeros(12), 0, 0,
                                               types["sensor_msgs/msg/RegionOfInterest"](0, 0, 0, 0, False))


def write_bag(path, messages) -> None:
    """A ROS2 sqlite3 bag of ``messages``: (topic, msgtype, log time ns, message), logged at the times given."""
    from rosbags.rosbag2 import StoragePlugin, Writer

    store, _ = _bag_types()
    with Writer(path, version=9, storage_plugin=StoragePlugin.SQLITE3) as writer:
        connections = {}
        for topic, msgtype, _, _ in messages:
            if topic not in connections:
                connections[topic] = writer.add_connection(topic, msgtype, typestore=store)
        for topic, msgtype, log_ns, msg in messages:
            writer.write(connections[topic], log_ns, store.serialize_cdr(msg, msgtype))


def convert_bag(bag, out, *extra) -> tuple[int, str]:
    return run_cli("convert", "--rosbag", bag, out, "--rgb-topic", "/cam/color", "--depth-topic", "/cam/depth",
                   "--no-progress", *extra)


T0 = 1_700_000_000 * 10**9  # ns, a plausible recording time
FRAME_NS = 33_333_333  # 30 Hz


def test_reliability_corrupt_jpeg_in_a_bag_names_topic_message_and_stamp(tmp_path):
    """Item 11: the error named `<_io.BytesIO object at 0x...>` instead of where the bad message is."""
    _, types = _bag_types()
    good = io.BytesIO()
    Image.fromarray(np.full((SIDE, SIDE, 3), 90, np.uint8)).save(good, format="JPEG")
    messages = []
    truncated = good.getvalue()[: len(good.getvalue()) // 2]
    for index, payload in enumerate([good.getvalue(), b"not a jpeg at all", truncated]):
        ns = T0 + index * FRAME_NS
        messages += [("/cam/color", "sensor_msgs/msg/CompressedImage", ns, jpeg_msg(types, ns, payload)),
                     ("/cam/depth", "sensor_msgs/msg/Image", ns + 1000, depth_msg(types, ns, 2000))]
    write_bag(tmp_path / "bag", messages)
    line = refusal(*convert_bag(tmp_path / "bag", tmp_path / "out.h5"))
    stamp = (T0 + FRAME_NS) * 1e-9
    assert line.startswith(f"/cam/color message #1 (stamp {stamp:.6f} s): cannot decode a compressed image"), line
    assert "BytesIO" not in line and "corrupt or truncated" in line and not (tmp_path / "out.h5").exists()
    messages[2:4] = []  # the truncated one (#2 of the bag, #1 of this one) is named the same way
    write_bag(tmp_path / "bag2", messages)
    line = refusal(*convert_bag(tmp_path / "bag2", tmp_path / "out.h5"))
    assert line.startswith(f"/cam/color message #1 (stamp {(T0 + 2 * FRAME_NS) * 1e-9:.6f} s): cannot decode"), line
    assert "corrupt or truncated" in line


def test_reliability_gif_frames_are_named_as_an_unsupported_format(tmp_path):
    """Item 11: a folder of .gif frames got the list of every layout, not why none matched."""
    for folder in ("rgb", "depth"):
        (tmp_path / "gifs" / folder).mkdir(parents=True)
        Image.fromarray(np.full((SIDE, SIDE), 120, np.uint8)).save(tmp_path / "gifs" / folder / "0000.gif")
    line = refusal(*convert(tmp_path / "gifs", tmp_path / "out.h5"))
    assert "holds GIF files" in line and "which mmtk does not read as frames" in line and ".png" in line
    assert "supported layouts" not in line and not (tmp_path / "out.h5").exists()


def test_reliability_info_with_stdout_closed_exits_non_zero_with_a_message(tmp_path, monkeypatch):
    """Item 11: `mmtk info x.h5 >&-` printed nothing and exited 0."""
    import subprocess
    import sys

    from mmtk.cli import data_cmds

    out = tmp_path / "demo.h5"
    assert convert(MULTIMAE, out)[0] == 0
    done = subprocess.run(["bash", "-c", 'exec "$0" -m mmtk.cli.main info "$1" >&-', sys.executable, out],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "error: standard output is closed" in done.stderr, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    monkeypatch.setattr(sys, "stdout", None)  # what Python makes of a closed stdout; `mmtk check` refuses it too
    with pytest.raises(MmtkError, match="standard output is closed, so `mmtk check` has nowhere to print"):
        data_cmds.check(out)


def test_reliability_hdf5_file_open_for_writing_elsewhere_is_in_use_not_corrupt(tmp_path):
    """Item 10: HDF5's file lock (a writer in another process) was reported as a corrupt file to re-create."""
    import subprocess
    import sys

    out = tmp_path / "demo.h5"
    assert convert(MULTIMAE, out)[0] == 0
    writer = subprocess.Popen([sys.executable, "-c", "import sys, time, h5py\nf = h5py.File(sys.argv[1], 'a')\n"
                               "print('open', flush=True)\ntime.sleep(60)", out], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "open"
        for command in ("info", "check"):
            line = refusal(*run_cli(command, out))
            assert "is in use: another process has it open for writing" in line, line
            assert "re-create" not in line and "not a readable HDF5 file" not in line
    finally:
        writer.kill()
        writer.wait()
    assert run_cli("check", out)[0] == 0  # the file was good all along


def _rgbd_bag(path, depth_mm: int = 2000, k: list[float] | None = None, frames: int = 3) -> None:
    """``frames`` colour + 16UC1 depth pairs stamped alike (30 Hz), and a CameraInfo with ``k`` beside each."""
    _, types = _bag_types()
    messages = []
    for index in range(frames):
        ns = T0 + index * FRAME_NS
        messages += [("/cam/color", "sensor_msgs/msg/Image", ns, colour_msg(types, ns, 10 * index)),
                     ("/cam/depth", "sensor_msgs/msg/Image", ns + 1000, depth_msg(types, ns, depth_mm))]
        if k is not None:
            messages.append(("/cam/camera_info", "sensor_msgs/msg/CameraInfo", ns, info_msg(types, ns, k)))
    write_bag(path, messages)


K_GOOD = [20.0, 0, 7.5, 0, 20.0, 7.5, 0, 0, 1]


@pytest.mark.parametrize("k", [[0.0] * 9, [float("nan")] * 9], ids=["zeros", "nan"])
def test_reliability_camera_info_with_an_unusable_k_is_not_stored(tmp_path, k):
    """Item 3: K all zeros (an uncalibrated camera) or NaN was stored as the intrinsics; `mmtk check` rejected the
    NaN file convert had just written and passed the zero one."""
    _rgbd_bag(tmp_path / "bag", k=k)
    out = tmp_path / "out.h5"
    code, text = convert_bag(tmp_path / "bag", out)
    assert code == 0, text
    problem = "all zeros" if k[0] == 0 else "non-finite"
    assert "NO intrinsics: the first CameraInfo on /cam/camera_info is unusable (camera matrix K" in text
    assert problem in text
    with h5py.File(out) as f:
        assert "intrinsics" not in f["all"] and f["all/rgb"].shape[0] == 3
    assert run_cli("check", out)[0] == 0

    with h5py.File(out, "r+") as f:  # a file of another tool (or of mmtk before this fix) that stored such a K
        f["all"].create_dataset("intrinsics", data=np.asarray([k] * 3, np.float32).reshape(3, 3, 3))
    code, text = run_cli("check", out)
    assert code == 1 and f"{out}:all frame 0 (/cam/color#0): intrinsics: camera matrix K" in text and problem in text


def test_reliability_writer_refuses_an_unusable_k_and_later_bad_camera_infos_are_skipped(tmp_path):
    from mmtk.data.format import H5Writer

    rgb = np.zeros((SIDE, SIDE, 3), np.uint8)
    with pytest.raises(MmtkError, match="camera matrix K is all zeros"):
        with H5Writer(tmp_path / "w.h5", source="test") as writer:
            writer.add_frame("all", {"rgb": rgb, "depth": np.ones((SIDE, SIDE), np.float32)},
                             intrinsics=np.zeros((3, 3)))
    assert not (tmp_path / "w.h5").exists()
    _, types = _bag_types()  # a calibrated camera whose CameraInfo later turns to NaN: the valid K is kept
    messages = []
    for index in range(3):
        ns = T0 + index * FRAME_NS
        messages += [("/cam/camera_info", "sensor_msgs/msg/CameraInfo", ns,
                      info_msg(types, ns, K_GOOD if index == 0 else [float("nan")] * 9)),
                     ("/cam/color", "sensor_msgs/msg/Image", ns, colour_msg(types, ns, 10 * index)),
                     ("/cam/depth", "sensor_msgs/msg/Image", ns + 1000, depth_msg(types, ns, 2000))]
    write_bag(tmp_path / "bag", messages)
    code, text = convert_bag(tmp_path / "bag", tmp_path / "out.h5")
    assert code == 0 and "NO intrinsics" not in text, text
    with h5py.File(tmp_path / "out.h5") as f:
        np.testing.assert_array_equal(f["all/intrinsics"][:], np.asarray([K_GOOD] * 3, np.float32).reshape(3, 3, 3))


def test_reliability_a_first_unusable_camera_info_gives_way_to_the_first_usable_one(tmp_path):
    """An uncalibrated first CameraInfo (K all zeros) made the source drop the topic: every frame lost its
    intrinsics although the later CameraInfos were calibrated. The first usable K now serves the frames before it."""
    _, types = _bag_types()
    messages = []
    for index in range(3):
        ns = T0 + index * FRAME_NS
        messages += [("/cam/camera_info", "sensor_msgs/msg/CameraInfo", ns,
                      info_msg(types, ns, [0.0] * 9 if index == 0 else K_GOOD)),
                     ("/cam/color", "sensor_msgs/msg/Image", ns, colour_msg(types, ns, 10 * index)),
                     ("/cam/depth", "sensor_msgs/msg/Image", ns + 1000, depth_msg(types, ns, 2000))]
    write_bag(tmp_path / "bag", messages)
    code, text = convert_bag(tmp_path / "bag", tmp_path / "out.h5")
    assert code == 0 and "NO intrinsics" not in text, text
    assert (f"the first CameraInfo on /cam/camera_info is unusable (camera matrix K is all zeros" in text
            and f"intrinsics from the first usable one ({(T0 + FRAME_NS) * 1e-9:.6f} s) on" in text), text
    with h5py.File(tmp_path / "out.h5") as f:
        np.testing.assert_array_equal(f["all/intrinsics"][:], np.asarray([K_GOOD] * 3, np.float32).reshape(3, 3, 3))


@pytest.mark.parametrize("values", [-1.0, np.nan, 0.0, 65535], ids=["negative", "nan", "zero", "saturated"])
def test_reliability_depth_with_no_valid_value_is_refused_not_written(tmp_path, values):
    """Item 5: all-invalid depth was written as a complete file with "0.0 % valid"; `mmtk check` said nothing."""
    src = tmp_path / "frames"
    for folder in ("rgb", "depth"):
        (src / folder).mkdir(parents=True)
    for name in ("0000", "0001"):
        Image.fromarray(np.full((SIDE, SIDE, 3), 100, np.uint8)).save(src / "rgb" / f"{name}.png")
        if values == 65535 or values == 0.0:
            Image.fromarray(np.full((SIDE, SIDE), values, np.uint16)).save(src / "depth" / f"{name}.png")
        else:
            np.save(src / "depth" / f"{name}.npy", np.full((SIDE, SIDE), values, np.float32))
    out = tmp_path / "out.h5"
    line = refusal(*convert(src, out))
    assert line.startswith("no frame of split 'all' has a valid depth value (2 frames, each all 0, NaN, negative or "
                           "saturated)") and "was not written" in line, line
    assert not out.exists() and not list(tmp_path.glob(".out.h5*"))

    bag = tmp_path / "bag"  # a bag's depth topic: the same
    _rgbd_bag(bag, depth_mm=0 if values != 65535 else 65535)
    assert "no frame of split 'all' has a valid depth" in refusal(*convert_bag(bag, out)) and not out.exists()


def test_reliability_check_reports_a_split_without_valid_depth(tmp_path):
    out = tmp_path / "demo.h5"
    assert convert(MULTIMAE, out)[0] == 0
    with h5py.File(out, "r+") as f:  # a file of another tool, or of mmtk before this check
        f["test/depth"][0] = 0.0
    code, text = run_cli("check", out)
    assert code == 1 and f"{out}:test: depth: none of its 1 frame has a valid value" in text, text
    assert "2 frames checked, 1 bad" in text


def _mm_folder(root, depth_mm: np.ndarray, name: str = "0000"):
    """rgb/ and depth/ (uint16 millimetres as given) with one frame."""
    for folder in ("rgb", "depth"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*depth_mm.shape, 3), 100, np.uint8)).save(root / "rgb" / f"{name}.png")
    Image.fromarray(depth_mm.astype(np.uint16)).save(root / "depth" / f"{name}.png")


def _rotate_left_3(mm: np.ndarray) -> np.ndarray:
    """How SUN RGB-D stores millimetres (the inverse of its toolbox's read3dPoints)."""
    mm = mm.astype(np.uint32)
    return (((mm << 3) | (mm >> 13)) & 0xFFFF).astype(np.uint16)


def test_reliability_millimetres_in_steps_of_8_are_not_read_as_sun_rotation(tmp_path):
    """Item 1: real millimetres that are all multiples of 8 were read as SUN's bit rotation, 8x too small (a
    constant 2000 mm became 0.25 m), and passed the indoor range check."""
    rng = np.random.default_rng(0)
    scene = (np.clip(rng.uniform(1.0, 6.0, (SIDE, SIDE)), 1.7, None) * 1000 // 8 * 8)  # clipped at 1.7 m, 8 mm steps
    for name, mm in (("clipped", scene), ("constant", np.full((SIDE, SIDE), 2000))):
        _mm_folder(tmp_path / name, mm)  # as SUN both would also lie in 0.2-12 m: the user is asked
        line = refusal(*convert(tmp_path / name, tmp_path / f"{name}.h5"))
        assert "multiples of 8, which fits both SUN RGB-D's bit-rotated millimetres (median" in line, line
        assert "pass --depth-format sun or --depth-format mm" in line and not (tmp_path / f"{name}.h5").exists()
        assert convert(tmp_path / name, tmp_path / f"{name}.h5", "--depth-format", "mm")[0] == 0
        assert median_depth(tmp_path / f"{name}.h5") == pytest.approx(np.median(mm) / 1000)

    near = np.full((SIDE, SIDE), 1200) // 8 * 8  # as SUN, 0.15 m: outside the indoor range, so millimetres
    _mm_folder(tmp_path / "near", near)
    code, text = convert(tmp_path / "near", tmp_path / "near.h5")
    assert code == 0 and "millimetres quantised to 8 mm" in text, text
    assert median_depth(tmp_path / "near.h5") == pytest.approx(1.2)

    sun_mm = rng.integers(900, 5000, (SIDE, SIDE))  # SUN's rotation of real millimetres: as mm, 7-40 m
    for folder, rule in (("frames", "as plain millimetres the depth would lie outside"), ("SUNRGBD", "says SUN")):
        _mm_folder(tmp_path / folder, _rotate_left_3(sun_mm))
        code, text = convert(tmp_path / folder, tmp_path / f"{folder}.h5")
        assert code == 0 and rule in text and "SUN RGB-D's bit-rotated millimetres" in text, text
        with h5py.File(tmp_path / f"{folder}.h5") as f:
            np.testing.assert_allclose(f["all/depth"][0], sun_mm / 1000, rtol=1e-6)
    _mm_folder(tmp_path / "sun3d", _rotate_left_3(np.full((SIDE, SIDE), 250)))  # a named SUN folder is SUN...
    code, text = convert(tmp_path / "sun3d", tmp_path / "sun3d.h5")  # ...even where mm would fit the range
    assert code == 0 and "name 'sun3d' says SUN RGB-D" in text and median_depth(tmp_path / "sun3d.h5") == 0.25


def _paired_bag(path, colour_stamps: list[int], depth_stamps: list[int], depth_log_offset_ns: int = 1000) -> None:
    """Pair i: colour value 10 i and depth 1000 + 100 i mm, stamped as given, logged at 30 Hz in pair order."""
    _, types = _bag_types()
    messages = []
    for index, (colour_ns, depth_ns) in enumerate(zip(colour_stamps, depth_stamps)):
        logged = T0 + index * FRAME_NS
        messages += [("/cam/color", "sensor_msgs/msg/Image", logged, colour_msg(types, colour_ns, 10 * index)),
                     ("/cam/depth", "sensor_msgs/msg/Image", logged + depth_log_offset_ns,
                      depth_msg(types, depth_ns, 1000 + 100 * index))]
    write_bag(path, messages)


def _pairs(path) -> list[tuple[int, float]]:
    """(colour value, depth mm) of each stored frame, in stored order."""
    with DecodedFile(path) as f:
        return [(int(rgb[0, 0, 0]), round(float(depth[0, 0]) * 1000)) for rgb, depth in zip(f["all/rgb"][:],
                                                                                               f["all/depth"][:])]


@pytest.mark.parametrize("case", ["against-log-order", "repeated", "zero"])
def test_reliability_bag_pairs_survive_stamps_against_log_order_repeated_or_zero(tmp_path, case):
    """Item 2: stamps running against the log order lost 2 of 4 pairs ("dropped 2 colour and 2 depth messages
    without a partner" though each had an exact one); repeated stamps kept 2 of 4 pairs, zero stamps 2 of 3."""
    count = 3 if case == "zero" else 4
    stamps = {"against-log-order": [T0 + (count - i) * FRAME_NS for i in range(count)],  # newest logged first
              "repeated": [T0] * count, "zero": [0] * count}[case]
    _paired_bag(tmp_path / "bag", stamps, stamps)
    code, text = convert_bag(tmp_path / "bag", tmp_path / "out.h5")
    assert code == 0 and f"paired {count} frames within 20 ms; dropped 0 colour and 0 depth messages" in text, text
    assert sorted(_pairs(tmp_path / "out.h5")) == [(10 * i, 1000 + 100 * i) for i in range(count)]  # exact partners
    assert ("header stamps are 0 (never set) on /cam/color, /cam/depth: every topic is paired by the time the "
            "recorder logged its messages instead" in text) == (case == "zero")


def test_reliability_stream_pairer_waits_a_bounded_time_for_partners_logged_out_of_stamp_order():
    from mmtk.data.sources.pairing import associate_by_time
    from mmtk.data.sources.ros.pairer import MAX_STREAM_LAG_S, StreamPairer

    assert associate_by_time([5.0] * 3, [5.0] * 3, 0.02, [0, 1, 2], [2.1, 1.1, 0.1]) == [(0, 2), (1, 1), (2, 0)]
    pairer, frames = StreamPairer(["rgb", "depth"], 0.02), []
    for index in range(300):  # depth arrives 1 s after its colour (30 frames later), stamps exact
        frames += pairer.add("rgb", index / 30, index, index / 30)
        if index >= 30:
            frames += pairer.add("depth", (index - 30) / 30, index - 30, index / 30)
    frames += pairer.finish()
    assert [(parts["rgb"], parts["depth"]) for _, parts in frames] == [(i, i) for i in range(270)]
    pairer, late = StreamPairer(["rgb", "depth"], 0.02), []  # a partner logged past the window is not waited for
    late += pairer.add("rgb", 0.0, "rgb", 0.0)
    late += pairer.add("depth", 5.0, "other", MAX_STREAM_LAG_S + 0.5)
    late += pairer.add("depth", 0.0, "too late", MAX_STREAM_LAG_S + 1)
    assert late + pairer.finish() == [] and not pairer.pending["rgb"]


def test_reliability_a_file_that_is_no_bag_is_one_line(tmp_path):
    """rosbags reads the file while telling ROS1 from ROS2: an image given as a bag is one line, not a traceback."""
    image = tmp_path / "frame.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(image)
    code, text = run_cli("convert", "--rosbag", image, tmp_path / "out.h5", "--rgb-topic", "/c", "--depth-topic", "/d")
    assert code == 2 and "is not a readable ROS1 bag or ROS2 bag" in text and "Traceback" not in text, text
    assert len(text.strip().splitlines()) == 1 and not (tmp_path / "out.h5").exists()
