"""Format 2: each array kept as the source gave it (JPEG bytes, integer depth with its scale) or losslessly, and
format 1 files still read unchanged."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from data_helpers import MULTIMAE, SYNC, TUM, run_cli
from mmtk.data import H5Dataset, H5Writer, read_info
from mmtk.data.check import check_file
from mmtk.data.codecs import Quantized, read_frame
from mmtk.data.convert import convert_rgbd
from mmtk.data.sources.depth_encoding import DepthEncoding, keep_depth, read_depth
from mmtk.data.sources.nyuv2_meta import nyuv2_meta
from mmtk.data.sources.image_files import read_colour
from mmtk.errors import MmtkError

MULTIMAE_DEPTH = DepthEncoding("multimae", 6553.6)


def png(path) -> np.ndarray:
    return np.array(Image.open(path))


def test_jpeg_bytes_kept_and_depth_integers_with_their_scale(tmp_path):
    out = tmp_path / "sync.h5"
    convert_rgbd(SYNC, out, progress=False)
    with h5py.File(out) as f:
        group = f["all"]
        assert group["rgb"].attrs["codec"] == "jpeg" and group["depth"].dtype == np.uint16
        assert group["depth"].attrs["scale"] == 1000.0
        for index, frame_id in enumerate(v.decode() for v in group["frame_id"][:]):
            source = SYNC / frame_id
            assert group["rgb"][index][:-4].tobytes() == source.read_bytes()  # the file's bytes, never re-encoded
            np.testing.assert_array_equal(read_frame(group["rgb"], index), png(source))
            depth_png = SYNC / "depth" / source.name.replace("rgb_", "sync_depth_").replace(".jpg", ".png")
            np.testing.assert_array_equal(group["depth"][index], png(depth_png))  # the PNG's millimetres
            metres = read_depth(depth_png, DepthEncoding("mm", 1000.0))  # what format 1 stored
            np.testing.assert_array_equal(read_frame(group["depth"], index), metres)


def test_png_layout_round_trips_pixel_exact(tmp_path):
    out = tmp_path / "mm.h5"
    convert_rgbd(MULTIMAE, out, progress=False)
    root = MULTIMAE / "train"
    with h5py.File(out) as f:
        group = f["train"]
        assert group["rgb"].attrs["codec"] == "qoi"  # a PNG's pixels, transcoded losslessly
        np.testing.assert_array_equal(read_frame(group["rgb"], 0), png(root / "rgb/data/0000.png"))
        np.testing.assert_array_equal(group["depth"][0], png(root / "depth/data/0000.png"))
        assert group["depth"].attrs["scale"] == 6553.6
        np.testing.assert_array_equal(read_frame(group["depth"], 0), read_depth(root / "depth/data/0000.png",
                                                                                MULTIMAE_DEPTH))
        np.testing.assert_array_equal(read_frame(group["semseg"], 0), png(root / "semseg/data/0000.png"))
    info = read_info(out)["splits"]["train"]["datasets"]
    stored = sum(info[name]["stored_bytes_per_frame"] for name in ("rgb", "depth", "semseg"))
    source = sum((root / name / "data/0000.png").stat().st_size for name in ("rgb", "depth", "semseg"))
    assert stored <= 1.25 * source  # the bound, on the real frame


def write_v1(path, rgb, depth_m, labels, classes) -> None:
    """A file exactly as format 1 stored it (mmtk <= this change): raw chunked arrays, float32 metres."""
    with h5py.File(path, "w") as f:
        f.attrs.update({"mmtk_format": 1, "source": "format 1", "created": "2025-01-01T00:00:00+00:00"})
        group = f.create_group("train")
        group.attrs["image_size"] = rgb.shape[:2]
        for name, value, units in (("rgb", rgb, "uint8 sRGB, channels R,G,B"), ("depth", depth_m, "m"),
                                   ("semseg", labels, "class id, 0 = unlabeled, k = classes[k-1]")):
            dataset = group.create_dataset(name, data=value[None], chunks=(1, *value.shape), maxshape=(None, *value.shape),
                                           fletcher32=True)
            dataset.attrs["units"] = units
        group["semseg"].attrs["classes"] = json.dumps(classes)
        group["semseg"].attrs["histogram"] = np.bincount(labels.ravel(), minlength=len(classes) + 1)
        group["depth"].attrs.update({"valid_fraction": 1.0, "min_m": float(depth_m.min()), "max_m": float(depth_m.max()),
                                     "p01_m": 1.0, "median_m": 2.0, "p99_m": 3.0})
        group.create_dataset("intrinsics", data=np.eye(3, dtype=np.float32)[None], chunks=(1, 3, 3), fletcher32=True)


def test_version_1_file_reads_unchanged_and_as_version_2(tmp_path):
    root = MULTIMAE / "train"
    rgb, labels = png(root / "rgb/data/0000.png"), png(root / "semseg/data/0000.png")
    depth = read_depth(root / "depth/data/0000.png", MULTIMAE_DEPTH)
    old, new = tmp_path / "v1.h5", tmp_path / "v2.h5"
    write_v1(old, rgb, depth, labels, nyuv2_meta()["names40"])
    convert_rgbd(MULTIMAE, new, progress=False)
    assert read_info(old)["format"] == 1 and read_info(new)["format"] == 2
    assert read_info(old)["splits"]["train"]["datasets"]["depth"]["codec"] == "none"
    assert check_file(old).bad == [] and check_file(new).bad == []
    a, b = (H5Dataset(p, split="train", image_size=None, augment=False)[0] for p in (old, new))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # the same tensors from either format


def test_float_depth_stays_float_and_range_beyond_65_m(tmp_path):
    rng = np.random.default_rng(0)
    far = rng.permutation(np.linspace(5.0, 150.0, 32 * 48, dtype=np.float32)).reshape(32, 48)  # lidar-like
    far_units = np.linspace(5000, 150_000, 32 * 48).astype(np.uint32).reshape(32, 48)  # beyond uint16 at 1000/m
    out = tmp_path / "far.h5"
    with H5Writer(out, source="test") as writer:
        writer.add_frame("train", {"rgb": np.zeros((32, 48, 3), np.uint8), "depth": far})
        writer.add_frame("test", {"rgb": np.zeros((32, 48, 3), np.uint8), "depth": Quantized(far_units, 1000.0)})
    with h5py.File(out) as f:
        assert f["train/depth"].dtype == np.float32 and "scale" not in f["train/depth"].attrs
        np.testing.assert_array_equal(read_frame(f["train/depth"], 0), far)
        assert f["test/depth"].dtype == np.uint32
        np.testing.assert_array_equal(f["test/depth"][0], far_units)
        assert read_frame(f["test/depth"], 0).max() == pytest.approx(150.0)
    assert read_info(out)["splits"]["test"]["depth"]["depth"]["max_m"] == pytest.approx(150.0)


def test_integer_depth_keeps_scale_and_saturation_is_invalid():
    raw = np.array([[0, 1000, 65535]], np.uint16)
    stored = keep_depth(raw, DepthEncoding("mm", 1000.0), "t")
    assert isinstance(stored, Quantized) and stored.scale == 1000.0
    np.testing.assert_array_equal(stored.values, [[0, 1000, 0]])  # 65535 = saturated, stored as 0 (invalid)
    np.testing.assert_array_equal(stored.decoded(), [[0.0, 1.0, 0.0]])
    assert not isinstance(keep_depth(raw, DepthEncoding("sun"), "t"), Quantized)  # bit-rotated: decoded to metres


def test_corrupt_encoded_bytes_fail_in_one_line(tmp_path):
    out = tmp_path / "mm.h5"
    convert_rgbd(MULTIMAE, out, progress=False)
    with h5py.File(out, "r+") as f:
        blob = f["train/rgb"][0].copy()
        blob[len(blob) // 2] ^= 0x10
        f["train/rgb"][0] = blob
    with pytest.raises(MmtkError) as err:
        H5Dataset(out, split="train")[0]
    assert "\n" not in str(err.value) and f"{out}:train frame 0" in str(err.value) and "CRC-32" in str(err.value)
    assert [(b.split, b.index, b.array) for b in check_file(out).bad] == [("train", 0, "rgb")]


def test_corrupt_jpeg_source_names_the_file(tmp_path):
    folder = tmp_path / "sync"
    (folder / "rgb").mkdir(parents=True)
    (folder / "depth").mkdir()
    (folder / "rgb/rgb_00000.jpg").write_bytes((SYNC / "rgb/rgb_00000.jpg").read_bytes()[:4000])  # truncated
    (folder / "depth/sync_depth_00000.png").write_bytes((SYNC / "depth/sync_depth_00000.png").read_bytes())
    with pytest.raises(MmtkError) as err:
        convert_rgbd(folder, tmp_path / "out.h5", progress=False)
    assert "\n" not in str(err.value) and "rgb_00000.jpg" in str(err.value)
    assert not (tmp_path / "out.h5").exists()
    assert isinstance(read_colour(SYNC / "rgb/rgb_00000.jpg").data, bytes)


def test_jpeg_quality_is_an_option_not_the_default(tmp_path):
    rgb = png(MULTIMAE / "train/rgb/data/0000.png")
    sizes = {}
    for quality in (None, 90):
        out = tmp_path / f"q{quality}.h5"
        with H5Writer(out, source="test", jpeg_quality=quality) as writer:
            writer.add_frame("train", {"rgb": rgb})
        with h5py.File(out) as f:
            decoded = read_frame(f["train/rgb"], 0)
            sizes[quality] = f["train/rgb"].attrs["encoded_bytes"]
            assert f["train/rgb"].attrs["codec"] == ("qoi" if quality is None else "jpeg")
        if quality is None:
            np.testing.assert_array_equal(decoded, rgb)
        else:
            assert 0 < np.abs(decoded.astype(int) - rgb).mean() < 3
    assert sizes[90] < sizes[None] / 2
    with pytest.raises(MmtkError, match="1..100"):
        H5Writer(tmp_path / "x.h5", source="test", jpeg_quality=0)


def test_size_checks_bound_byte_and_compressed_datasets(tmp_path):
    out = tmp_path / "mm.h5"
    convert_rgbd(MULTIMAE, out, progress=False)
    forged = tmp_path / "forged.h5"
    forged.write_bytes(out.read_bytes())
    with h5py.File(forged, "r+") as f:
        f["train/rgb"].attrs["frame_shape"] = [100_000, 100_000, 3]
    with pytest.raises(MmtkError, match="axes beyond"):
        read_info(forged)
    forged.write_bytes(out.read_bytes())
    with h5py.File(forged, "r+") as f:
        f["train/depth"].resize(10**9, axis=0)  # frames the file never stored (compressed: no ratio bound)
    with pytest.raises(MmtkError, match="declares 1000000000 frames but the file stores 1"):
        read_info(forged)


def test_convert_jpeg_quality_flag_and_image_folders_keep_jpeg_bytes(tmp_path):
    out = tmp_path / "q.h5"
    assert run_cli("convert", "--rgbd", MULTIMAE, out, "--jpeg-quality", "90", "--no-progress")[0] == 0
    with h5py.File(out) as f:
        assert f["train/rgb"].attrs["codec"] == "jpeg"  # the PNG's pixels, lossy only because it was asked
    code, text = run_cli("convert", "--rgbd", MULTIMAE, tmp_path / "bad.h5", "--jpeg-quality", "101", "--no-progress")
    assert code != 0 and "1..100" in text
    from mmtk.data.convert import convert_images

    convert_images(SYNC / "rgb", tmp_path / "photos.h5", progress=False)
    with h5py.File(tmp_path / "photos.h5") as f:
        names = [v.decode() for v in f["train/frame_id"][:]]
        for index, name in enumerate(names):
            assert f["train/rgb"][index][:-4].tobytes() == (SYNC / "rgb" / name).read_bytes()


def test_tum_depth_keeps_its_1_5000_m_integers(tmp_path):
    out = tmp_path / "tum.h5"
    convert_rgbd(TUM, out, depth_format="tum", progress=False)
    raw = png(TUM / "TUM_depth.png")
    with h5py.File(out) as f:
        assert f["all/depth"].attrs["scale"] == 5000.0 and f["all/depth"].dtype == np.uint16
        np.testing.assert_array_equal(f["all/depth"][0], raw)
        np.testing.assert_array_equal(read_frame(f["all/rgb"], 0), png(TUM / "TUM_color.png")[..., :3])
