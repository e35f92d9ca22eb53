"""Hostile files (issue 10, items 1 and 5): depth units are read or refused, layouts never guess silently,
and values inside mmtk files are checked where they are used. Plus a fuzz test over recipe values."""

from __future__ import annotations

import dataclasses
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
    from mmtk.data.sources.base import DepthEncoding, decode_depth

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
    from mmtk.data.sources.base import find_intrinsics, read_intrinsics_file

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
