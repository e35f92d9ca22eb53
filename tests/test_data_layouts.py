"""`mmtk convert --rgbd` on every folder layout, with real frames: units, pairing, splits, intrinsics."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
from PIL import Image

from data_helpers import DecodedFile, MULTIMAE, SAMPLES, SYNC, TUM, labeled_frame, run_cli, shared


def convert(src, out, *extra):
    code, text = run_cli("convert", "--rgbd", src, out, "--no-progress", *extra)
    assert code == 0, text
    return text


def test_multimae_layout_units_labels_and_splits(tmp_path):
    out = tmp_path / "mm.h5"
    text = convert(MULTIMAE, out)
    assert "layout: multimae" in text
    rgb, _, labels = labeled_frame()
    depth_units = np.array(Image.open(MULTIMAE / "test/depth/data/0000.png"))
    with DecodedFile(out) as f:
        assert set(f) == {"train", "test"}
        np.testing.assert_array_equal(f["test/rgb"][0], rgb)
        np.testing.assert_allclose(f["test/depth"][0], depth_units / 6553.6, rtol=1e-6)
        assert 1.7 < f["test/depth"][0].min() and f["test/depth"][0].max() < 3.7   # metres, as in the source npy
        np.testing.assert_array_equal(f["train/semseg"][0], labels)
        assert json.loads(f["train/semseg"].attrs["classes"])[21] == "ceiling"


def test_multimae_frame_missing_a_modality_is_reported_not_shifted(tmp_path):
    src = tmp_path / "mm"
    shutil.copytree(MULTIMAE, src)
    shutil.copy(src / "train/rgb/data/0000.png", src / "train/rgb/data/0001.png")  # rgb with no depth/semseg
    out = tmp_path / "mm.h5"
    text = convert(src, out)
    assert "skipped 1 train/rgb files without all other modalities: 0001" in text
    with DecodedFile(out) as f:
        assert f["train/rgb"].shape[0] == 1


def test_bts_sync_layout_millimetres_and_intrinsics(tmp_path):
    out = tmp_path / "sync.h5"
    text = convert(SYNC, out)
    assert "layout: bts-sync" in text
    mm = np.array(Image.open(SYNC / "depth/sync_depth_00050.png"))
    with DecodedFile(out) as f:
        ids = [s.decode() for s in f["all/frame_id"][:]]
        assert ids == ["rgb/rgb_00000.jpg", "rgb/rgb_00050.jpg", "rgb/rgb_00100.jpg"]
        np.testing.assert_allclose(f["all/depth"][1], mm / 1000.0, rtol=1e-6)
        assert (f["all/depth"][1] == 0).mean() == pytest.approx((mm == 0).mean())
        np.testing.assert_array_equal(f["all/rgb"][2], np.array(Image.open(SYNC / "rgb/rgb_00100.jpg")))
        assert f["all/intrinsics"][0][0, 2] == pytest.approx(324.5824, abs=1e-3)


def test_depth_scale_override_changes_units(tmp_path):
    out = tmp_path / "sync_cm.h5"
    convert(SYNC, out, "--depth-scale", "100")
    mm = np.array(Image.open(SYNC / "depth/sync_depth_00000.png"))
    with DecodedFile(out) as f:
        np.testing.assert_allclose(f["all/depth"][0], mm / 100.0, rtol=1e-6)


def test_sparse_to_dense_h5_layout(tmp_path):
    src = tmp_path / "nyudepthv2"
    for split, name in (("train/basement_0001a", "00001.h5"), ("val/official", "00001.h5")):
        (src / split).mkdir(parents=True)
        rgb = np.array(Image.open(SYNC / "rgb/rgb_00000.jpg"))
        depth = np.array(Image.open(SYNC / "depth/sync_depth_00000.png")) / np.float32(1000)
        with h5py.File(src / split / name, "w") as f:
            f["rgb"] = rgb.transpose(2, 0, 1)  # [3, H, W] as in sparse-to-dense
            f["depth"] = depth.astype(np.float32)
    out = tmp_path / "s2d.h5"
    text = convert(src, out)
    assert "layout: sparse-to-dense" in text
    with DecodedFile(out) as f:
        assert f["train/rgb"].shape == (1, 480, 640, 3) and f["test/rgb"].shape[0] == 1
        np.testing.assert_array_equal(f["test/rgb"][0], rgb)
        np.testing.assert_array_equal(f["train/depth"][0], depth.astype(np.float32))


def _tum_folder(root, stamps_rgb, stamps_depth):
    (root / "rgb").mkdir(parents=True)
    (root / "depth").mkdir()
    for t in stamps_rgb:
        shutil.copy(TUM / "TUM_color.png", root / "rgb" / f"{t}.png")
    for t in stamps_depth:
        shutil.copy(TUM / "TUM_depth.png", root / "depth" / f"{t}.png")


def test_tum_layout_pairs_by_timestamp_and_reports_orphans(tmp_path):
    src = tmp_path / "tum"
    # depth 0.010 s after the first colour frame; the last colour frame has no depth within 20 ms
    _tum_folder(src, ["1305031102.175304", "1305031102.211214", "1305031103.000000"],
                ["1305031102.185000", "1305031102.205000"])
    out = tmp_path / "tum.h5"
    text = convert(src, out)
    assert "layout: tum" in text and "skipped 1 rgb frames without depth: 1305031103.000000.png" in text
    raw = np.array(Image.open(TUM / "TUM_depth.png"))
    with DecodedFile(out) as f:
        np.testing.assert_allclose(f["all/timestamp"][:], [1305031102.175304, 1305031102.211214])
        np.testing.assert_allclose(f["all/depth"][0], raw / 5000.0, rtol=1e-6)  # TUM: 5000 units per metre


def test_tum_associations_file(tmp_path):
    src = tmp_path / "tum"
    _tum_folder(src, ["10.0"], ["10.5"])
    (src / "associations.txt").write_text("10.0 rgb/10.0.png 10.5 depth/10.5.png\n")
    out = tmp_path / "tum.h5"
    assert "pairs from associations.txt" in convert(src, out)
    with DecodedFile(out) as f:
        assert f["all/timestamp"][:].tolist() == [10.0]


def test_malformed_folders_are_one_line_errors(tmp_path):
    def error(src):
        code, text = run_cli("convert", "--rgbd", src, tmp_path / "out.h5", "--no-progress")
        assert code == 2 and not (tmp_path / "out.h5").exists()
        return text.split("error: ", 1)[1].strip()

    tum = tmp_path / "tum"
    _tum_folder(tum, ["10.0"], ["10.5"])
    (tum / "associations.txt").write_text("ten rgb/10.0.png 10.5 depth/10.5.png\n")
    assert "associations.txt:1: the time stamps must be numbers (seconds)" in error(tum)
    s2d = tmp_path / "nyudepthv2" / "val" / "official"
    s2d.mkdir(parents=True)
    with h5py.File(s2d / "00001.h5", "w") as f:
        f["rgb"], f["depth"] = np.zeros((480, 640), np.uint8), np.ones((480, 640), np.float32)
    assert "rgb is uint8 (480, 640), expected uint8 [3, H, W]" in error(tmp_path / "nyudepthv2")
    paired = tmp_path / "paired"
    for folder, name in (("image", "a.png"), ("depth", "a.png"), ("labels", "b.png")):
        (paired / folder).mkdir(parents=True)
        shutil.copy(TUM / ("TUM_depth.png" if folder == "depth" else "TUM_color.png"), paired / folder / name)
    assert "no label file shares its name with a colour/depth pair" in error(paired)


def test_generic_pairs_read_tum_units_by_name_and_refuse_an_implausible_guess(tmp_path):
    out = tmp_path / "tum_named.h5"
    text = convert(TUM, out)
    assert "name 'TUM_depth.png' says TUM RGB-D (5000 units/m)" in text
    raw = np.array(Image.open(TUM / "TUM_depth.png"))
    with DecodedFile(out) as f:
        np.testing.assert_allclose(f["all/depth"][0], raw / 5000.0, rtol=1e-6)
        assert f["all/depth"].attrs["valid_fraction"] == pytest.approx((raw > 0).mean())
    anonymous = tmp_path / "frames"  # the same files without the name: millimetres would give 7-47 m
    anonymous.mkdir()
    shutil.copy(TUM / "TUM_color.png", anonymous / "a_color.png")
    shutil.copy(TUM / "TUM_depth.png", anonymous / "a_depth.png")
    code, text = run_cli("convert", "--rgbd", anonymous, tmp_path / "x.h5", "--no-progress")
    assert code == 2 and not (tmp_path / "x.h5").exists()
    line = text.split("error: ", 1)[1].strip()
    assert "\n" not in line and "median 12.07 m" in line and "outside the sensor range 0.2-12 m" in line
    assert "--depth-format" in line and "tum gives median 2.41 m" in line and "--depth-scale" in line
    convert(anonymous, tmp_path / "ok.h5", "--depth-format", "tum")
    convert(anonymous, tmp_path / "ok2.h5", "--depth-scale", "5000")
    with DecodedFile(tmp_path / "ok.h5") as f, DecodedFile(tmp_path / "ok2.h5") as g:
        np.testing.assert_array_equal(f["all/depth"][0], g["all/depth"][0])


def test_generic_rgb_depth_label_folders_on_sagate_frame(tmp_path):
    src = shared("nyuv2_sagate_labeled")
    out = tmp_path / "sagate.h5"
    text = convert(src, out)
    assert "float depth (float32) read as metres" in text
    _, _, labels = labeled_frame()
    with DecodedFile(out) as f:
        np.testing.assert_array_equal(f["all/depth"][0], np.load(src / "Depth/0.npy"))
        np.testing.assert_array_equal(f["all/semseg"][0], labels)


def test_pcl_tiff_pairs_millimetres(tmp_path):
    src = shared("pcl_kinect_grabber/tiff")
    out = tmp_path / "pcl.h5"
    convert(src, out)
    with DecodedFile(out) as f:
        depth = f["all/depth"][:]
        ids = [s.decode() for s in f["all/frame_id"][:]]
    assert ids[0] == "frame_20121214T142255.814212_rgb.tiff"
    mm = np.array(Image.open(src / "frame_20121214T142255.814212_depth.tiff"))
    np.testing.assert_allclose(depth[0], mm / 1000.0, rtol=1e-6)
    assert 0.6 < depth[depth > 0].min() and depth.max() < 1.8


def test_resize_on_the_way_in(tmp_path):
    out = tmp_path / "small.h5"
    convert(SYNC, out, "--size", "240x320")
    mm = np.array(Image.open(SYNC / "depth/sync_depth_00000.png")) / 1000.0
    with DecodedFile(out) as f:
        depth = f["all/depth"][0]
        k = f["all/intrinsics"][0]
    assert depth.shape == (240, 320)
    assert k[0, 0] == pytest.approx(518.8579 / 2, abs=1e-3) and k[0, 2] == pytest.approx((324.5824 + 0.5) / 2 - 0.5, abs=1e-3)
    valid = depth > 0
    # no mixing: each valid output lies within the valid source values under its 4x4 antialiasing support
    padded = np.pad(mm, 1)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (4, 4))[::2, ::2].reshape(240, 320, 16)
    lo = np.where(windows > 0, windows, np.inf).min(-1)
    hi = windows.max(-1)
    assert np.all(depth[valid] >= lo[valid] - 1e-4) and np.all(depth[valid] <= hi[valid] + 1e-4)
    naive = mm.reshape(240, 2, 320, 2).mean((1, 3))  # plain averaging pulls edges towards 0
    assert (naive[valid] < lo[valid] - 0.05).sum() > 100
    assert valid.mean() == pytest.approx((mm > 0).mean(), abs=0.02)


def test_size_of_another_aspect_ratio_crops_the_centre_and_moves_the_principal_point(tmp_path):
    # --size means the same for every source: resize to cover HxW keeping the aspect ratio, crop the centre.
    # 480x640 -> 240x240: the centred 480x480 window (columns 80-559) is halved.
    from mmtk.data.resize import resize_stored

    out = tmp_path / "square.h5"
    convert(SYNC, out, "--size", "240x240")
    mm = np.array(Image.open(SYNC / "depth/sync_depth_00000.png")).astype(np.float32) / 1000.0
    with DecodedFile(out) as f:
        depth, k, rgb = f["all/depth"][0], f["all/intrinsics"][0], f["all/rgb"][0]
    assert depth.shape == (240, 240) and rgb.shape == (240, 240, 3)
    np.testing.assert_allclose(depth, resize_stored("metric", mm[:, 80:560], (240, 240)), rtol=1e-6)
    assert k[0, 0] == pytest.approx(518.8579 / 2, abs=1e-3) and k[1, 1] == pytest.approx(519.4696 / 2, abs=1e-3)
    assert k[0, 2] == pytest.approx((324.5824 - 80 + 0.5) / 2 - 0.5, abs=1e-3)


def test_resize_keeps_labels_as_labels(tmp_path):
    out = tmp_path / "mm_small.h5"
    convert(MULTIMAE, out, "--size", "120x160")
    _, _, labels = labeled_frame()
    with DecodedFile(out) as f:
        small = f["train/semseg"][0]
    assert set(np.unique(small)) <= set(np.unique(labels))
    assert (small == labels[2::4, 2::4]).mean() > 0.9


@pytest.mark.parametrize("mode", ["P", "LA", "RGBA", "CMYK", "1"])
def test_colour_images_in_other_modes_are_read_as_rgb(tmp_path, mode):
    from mmtk.data.sources.image_files import read_rgb

    rgb, _, _ = labeled_frame()
    image = Image.fromarray(rgb).quantize(256) if mode == "P" else Image.fromarray(rgb).convert(mode)
    path = tmp_path / ("frame.jpg" if mode == "CMYK" else "frame.png")
    image.save(path)
    with Image.open(path) as stored:
        expected = np.array(stored.convert("RGB"))
    got = read_rgb(path)
    assert got.shape == rgb.shape and got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)
    if mode == "P":  # palette indices are not colours
        assert np.abs(got.astype(int) - rgb).mean() < 10


def test_guessed_units_compute_each_reading_of_a_frame_s_percentiles_once(monkeypatch):
    # A folder whose units are guessed reads its first frame by every depth format (for the guess, the
    # refusal's hint and the range check): the percentiles of each reading are computed once, passed along.
    import hashlib

    import mmtk.data.sources.folders as folders
    import mmtk.data.sources.layouts.depth_units as depth_units
    import mmtk.data.values as values
    from mmtk.data.sources.frame import ConvertOptions

    computed: list[str] = []
    original = values.depth_percentiles

    def counted(depth):
        computed.append(hashlib.sha256(np.ascontiguousarray(depth).tobytes()).hexdigest())
        return original(depth)

    monkeypatch.setattr(values, "depth_percentiles", counted)
    monkeypatch.setattr(depth_units, "depth_percentiles", counted)
    source = folders.open_rgbd_source(shared("esanet_kinect2_sample"), ConvertOptions())  # Kinect v2: guessed
    assert any("read as 0.1 mm" in note for note in source.notes)
    assert len(computed) == len(set(computed)) >= 3  # mm (the guess), 0.1 mm (the check), the other formats
    computed.clear()
    frames = list(source.frames())
    assert len(frames) == 1 and len(computed) == 1  # each frame checked against the sensor range once


def test_stream_glob_adds_an_image_stream_matched_by_file_stem(tmp_path, monkeypatch):
    """`--stream NAME=ir/*.png` stores each frame's file of the same stem, as the plugin adapter declares it."""
    import mmtk.modality
    from test_plugin_modality import IR_ADAPTER

    # test_plugin_modality's `ir` adapter under a name of its own, registered for this test only
    mmtk.modality.list_modalities()  # mmtk's own adapters registered (once per process) before the copy
    monkeypatch.setattr(mmtk.modality, "_REGISTRY", dict(mmtk.modality._REGISTRY))
    plugin = tmp_path / "stream_ir_adapter.py"
    plugin.write_text(IR_ADAPTER.replace('"ir"', '"stream_ir"'))
    src = tmp_path / "src"
    for name in ("color", "depth", "ir"):
        (src / name).mkdir(parents=True)
    frame = SAMPLES / "pcl_kinect" / "frame_20121214T142255.814212"
    ir = [np.arange(480 * 640, dtype=np.uint16).reshape(480, 640) * np.uint16(k) for k in (1, 3)]
    for stem, image in zip(("0001", "0002"), ir):
        shutil.copy(f"{frame}_rgb.png", src / "color" / f"{stem}.png")
        shutil.copy(f"{frame}_depth.png", src / "depth" / f"{stem}.png")
        Image.fromarray(image).save(src / "ir" / f"{stem}.png")
    out = tmp_path / "out.h5"
    code, text = run_cli("convert", "--rgbd", src, out, "--depth-scale", "1000", "--stream",
                         "stream_ir=ir/*.png", "--plugin", plugin, "--no-progress")
    assert code == 0, text
    with DecodedFile(out) as f:
        assert [v.decode() for v in f["all/frame_id"][()]] == ["color/0001.png", "color/0002.png"]
        np.testing.assert_array_equal(f["all/stream_ir"][()], np.stack(ir))
    (src / "ir" / "0002.png").unlink()
    code, text = run_cli("convert", "--rgbd", src, tmp_path / "x.h5", "--depth-scale", "1000", "--stream",
                         "stream_ir=ir/*.png", "--plugin", plugin, "--no-progress")
    assert code == 2 and "--stream stream_ir: no file named 0002.* for frame color/0002.png" in text, text
    assert not (tmp_path / "x.h5").exists()
