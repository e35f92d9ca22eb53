"""The HDF5 writer (atomic, validated), read_info / `mmtk info`, and bad input errors from `mmtk convert`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
from PIL import Image

from data_helpers import BAG1, MULTIMAE, REPO, SYNC, TUM, labeled_frame, run_cli
from mmtk.data import FORMAT_VERSION, H5Writer, read_info
from mmtk.data.codecs import read_frame
from mmtk.errors import MmtkError
from mmtk.modality import Modality, StoredArray, register_modality

NAMES = ["wall", "floor", "cabinet"]


@register_modality
class Material(Modality):
    """Per-pixel material ids: a label array whose name says nothing of labels."""

    name = "test_material"
    stores = (StoredArray("test_material", "labels", ("uint8",), "class id, 0 = unlabeled, k = classes[k-1]"),)


def frame():
    rgb, depth, labels = labeled_frame()
    return rgb, depth, np.minimum(labels, 3)


def test_writer_layout_attrs_and_stats(tmp_path):
    rgb, depth, labels = frame()
    out = tmp_path / "w.h5"
    with H5Writer(out, source="unit test", classes=NAMES) as writer:
        for i in range(2):
            writer.add_frame("train", {"rgb": rgb, "depth": depth, "semseg": labels}, intrinsics=np.eye(3),
                             timestamp=10.0 + i, frame_id=f"f{i}")
        assert not out.exists()  # nothing under the final name until the end
    with h5py.File(out) as f:
        assert f.attrs["mmtk_format"] == FORMAT_VERSION and f.attrs["source"] == "unit test"
        assert list(f["train/rgb"].attrs["frame_shape"]) == [480, 640, 3] and f["train/rgb"].attrs["codec"] == "qoi"
        assert f["train/depth"].chunks == (1, 480, 640) and f["train/depth"].fletcher32
        assert f["train/semseg"].dtype == np.uint8 and json.loads(f["train/semseg"].attrs["classes"]) == NAMES
        assert f["train/timestamp"].attrs["units"] == "s"
    info = read_info(out)
    split = info["splits"]["train"]
    assert split["frames"] == 2 and split["image_size"] == [480, 640]
    assert split["depth"]["depth"]["min_m"] == pytest.approx(float(depth.min()))
    assert split["class_histogram"]["cabinet"] == 2 * int((labels == 3).sum())
    assert info["units"]["depth"] == "m"


def test_writer_metadata_written_in_blocks_matches_every_frame(tmp_path, monkeypatch):
    # Timestamps, frame ids and intrinsics are buffered and written META_BLOCK frames at a time (3 here, so the
    # 7 + 5 frames of two interleaved splits cross block ends and end on partial blocks written at close).
    import mmtk.data.format as fmt

    monkeypatch.setattr(fmt, "META_BLOCK", 3)
    out = tmp_path / "w.h5"
    counts = {"train": 7, "test": 5}
    with H5Writer(out, source="unit test") as writer:
        for i in range(max(counts.values())):
            for split, count in counts.items():
                if i < count:
                    writer.add_frame(split, {"rgb": np.full((8, 8, 3), i, np.uint8),
                                             "depth": np.full((8, 8), 1.0 + i, np.float32)},
                                     intrinsics=np.diag([500.0 + i, 500.0, 1.0]), timestamp=100.0 + i / 30,
                                     frame_id=f"{split}/{i:04d}.png")
    with h5py.File(out) as f:
        for split, count in counts.items():
            group = f[split]
            assert {len(group[key]) for key in ("rgb", "depth", "intrinsics", "timestamp", "frame_id")} == {count}
            np.testing.assert_array_equal(group["timestamp"][:], [100.0 + i / 30 for i in range(count)])
            assert [v.decode() for v in group["frame_id"][:]] == [f"{split}/{i:04d}.png" for i in range(count)]
            np.testing.assert_array_equal(group["intrinsics"][:, 0, 0], 500.0 + np.arange(count))
            rgb = [read_frame(group["rgb"], i)[0, 0, 0] for i in range(count)]
            np.testing.assert_array_equal(rgb, np.arange(count))  # frame i beside metadata i


def test_writer_is_atomic_and_refuses_overwrite(tmp_path):
    rgb, depth, labels = frame()
    out = tmp_path / "w.h5"
    with pytest.raises(RuntimeError):
        with H5Writer(out, source="x") as writer:
            writer.add_frame("all", {"rgb": rgb, "depth": depth})
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    out.write_bytes(b"keep me")
    with pytest.raises(MmtkError, match="already exists"):
        with H5Writer(out, source="x") as writer:
            writer.add_frame("all", {"rgb": rgb, "depth": depth})
    assert out.read_bytes() == b"keep me"
    with H5Writer(out, source="x", force=True) as writer:
        writer.add_frame("all", {"rgb": rgb, "depth": depth})
    assert read_info(out)["splits"]["all"]["frames"] == 1


@pytest.mark.parametrize("case, message", [
    ("mm_as_m", "looks like millimetres"),
    ("label_beyond", "beyond the 3-class map"),
    ("size_mismatch", "split's images are 480x640"),
    ("missing_modality", "every frame of a split needs the same modalities"),
    ("classes_after_labels", "set the class names before the first frame with labels"),
    ("empty", "no frames were written"),
])
def test_writer_rejects_bad_frames(tmp_path, case, message):
    rgb, depth, labels = frame()
    out = tmp_path / "bad.h5"
    with pytest.raises(MmtkError, match=message):
        with H5Writer(out, source="x", classes=NAMES) as writer:
            if case == "mm_as_m":
                writer.add_frame("all", {"rgb": rgb, "depth": depth * 1000})
            elif case == "label_beyond":
                writer.add_frame("all", {"rgb": rgb, "depth": depth, "semseg": labels + 1})
            elif case == "size_mismatch":
                writer.add_frame("all", {"rgb": rgb, "depth": depth})
                writer.add_frame("all", {"rgb": rgb[:240], "depth": depth[:240]})
            elif case == "missing_modality":
                writer.add_frame("all", {"rgb": rgb, "depth": depth, "semseg": labels})
                writer.add_frame("all", {"rgb": rgb, "depth": depth})
            elif case == "classes_after_labels":
                writer.add_frame("test", {"rgb": rgb, "depth": depth})
                writer.set_classes(NAMES)  # no labels written yet: allowed
                writer.add_frame("train", {"rgb": rgb, "depth": depth, "semseg": labels})
                writer.set_classes(NAMES[:2])
    assert list(tmp_path.iterdir()) == []


def test_info_text_and_json(tmp_path):
    out = tmp_path / "mm.h5"
    assert run_cli("convert", "--rgbd", MULTIMAE, out, "--no-progress")[0] == 0
    code, text = run_cli("info", out)
    assert code == 0
    assert "[train] 1 frames, 480x640 px" in text and "depth: median " in text and "range 1.79" in text and "wall 40.8 %" in text
    code, text = run_cli("info", out, "--json")
    data = json.loads(text)
    depth = data["splits"]["test"]["datasets"]["depth"]  # the PNG's integers at 6553.6 per metre, read as metres
    assert depth == {"shape": [1, 480, 640], "dtype": "float32", "units": "m", "bytes_per_frame": 480 * 640 * 4,
                     "codec": "blosc2", "scale": 6553.6, "stored_bytes_per_frame": depth["stored_bytes_per_frame"]}
    assert 0 < depth["stored_bytes_per_frame"] < 480 * 640 * 2
    assert data["classes"][0] == "wall"


def _assert_clean_error(tmp_path, args, expect):
    out = tmp_path / "out.h5"
    code, text = run_cli("convert", *args, out, "--no-progress")
    assert code == 2, text
    error_lines = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and expect in error_lines[0], text
    assert "Traceback" not in text
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("out.h5")]


def test_info_takes_labels_by_their_adapters_kind_and_skips_predicted_ones(tmp_path):
    rgb, depth, labels = frame()
    out = tmp_path / "w.h5"
    with H5Writer(out, source="unit test", classes=NAMES) as writer:
        writer.add_frame("train", {"rgb": rgb, "depth": depth, "test_material": labels})
    info = read_info(out)
    assert info["classes"] == NAMES
    assert info["splits"]["train"]["class_histogram"]["cabinet"] == int((labels == 3).sum())
    with h5py.File(out, "r+") as f:  # as `mmtk pseudo-label` adds labels: a network's classes and its "model"
        f["train/semseg_pseudo"] = labels[None]
        f["train/semseg_pseudo"].attrs.update({"classes": json.dumps(["floor", "box"]), "model": "/models/seg"})
        f["train/test_material"].attrs["model"] = "/models/material"  # the adapter's labels, but predicted
    info = read_info(out)
    assert info["classes"] is None and info["splits"]["train"]["class_histogram"] is None


def test_check_refuses_an_absurd_frame_size_when_opening_the_file(tmp_path):
    # `mmtk check` has no per-frame size rule of its own: check_declared_sizes, run by open_mmtk_file, refuses
    # every dataset of every split whose frame declares over 1 GiB (here 16384x16384 float64: 2 GiB) first.
    path = tmp_path / "bomb.h5"
    with h5py.File(path, "w") as f:
        f.attrs["mmtk_format"] = FORMAT_VERSION
        f.create_dataset("all/rgb", shape=(1, 8, 8, 3), dtype=np.uint8, data=np.zeros((1, 8, 8, 3), np.uint8))
        f.create_dataset("all/depth", shape=(1, 16384, 16384), dtype=np.float64, chunks=(1, 1024, 1024))
    code, text = run_cli("check", path)
    assert code == 2 and text.count("\n") == 1, text
    assert "/all/depth declares 2.0 GiB per frame" in text and "over the 1.0 GiB limit" in text


def test_unknown_layout_lists_supported(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_text("hello")
    _assert_clean_error(tmp_path, ["--rgbd", tmp_path / "src"], "the supported layouts, one per line:")
    _, text = run_cli("convert", "--rgbd", tmp_path / "src", tmp_path / "out.h5", "--no-progress")
    from mmtk.data.sources.folders import list_layouts

    lines = text.splitlines()
    assert all(any(line.startswith(f"  {name}: ") for line in lines) for name in list_layouts()), text
    assert max(map(len, lines)) < 200, text  # no 900-character line


def test_millimetres_given_as_metres(tmp_path):
    _assert_clean_error(tmp_path, ["--rgbd", SYNC, "--depth-scale", "1"], "looks like millimetres")


def test_mismatched_rgb_depth_sizes(tmp_path):
    src = tmp_path / "pairs"
    src.mkdir()
    shutil.copy(TUM / "TUM_color.png", src / "a_color.png")
    Image.open(TUM / "TUM_depth.png").crop((0, 0, 320, 240)).save(src / "a_depth.png")
    _assert_clean_error(tmp_path, ["--rgbd", src, "--depth-format", "tum"], "rgb is 480x640 but depth is 240x320")


def test_corrupt_image(tmp_path):
    src = tmp_path / "sync"
    shutil.copytree(SYNC, src)
    data = (src / "depth" / "sync_depth_00050.png").read_bytes()
    (src / "depth" / "sync_depth_00050.png").write_bytes(data[: len(data) // 2])
    _assert_clean_error(tmp_path, ["--rgbd", src], "corrupt or truncated")


def test_empty_split(tmp_path):
    src = tmp_path / "mm"
    shutil.copytree(MULTIMAE, src)
    for path in (src / "test" / "depth" / "data").iterdir():
        path.unlink()
    _assert_clean_error(tmp_path, ["--rgbd", src], "split 'test' has no frame")


def test_label_beyond_class_map(tmp_path):
    src = tmp_path / "mm"
    shutil.copytree(MULTIMAE, src)
    labels = np.array(Image.open(src / "train/semseg/data/0000.png"))
    labels[0, 0] = 41
    Image.fromarray(labels).save(src / "train/semseg/data/0000.png")
    _assert_clean_error(tmp_path, ["--rgbd", src], "label 41 is beyond the 40-class map")


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "out.h5"
    out.write_bytes(b"old")
    code, text = run_cli("convert", "--rgbd", SYNC, out, "--no-progress")
    assert code == 2 and "--force" in text and out.read_bytes() == b"old"
    code, text = run_cli("convert", "--rgbd", SYNC, out, "--no-progress", "--force")
    assert code == 0 and read_info(out)["splits"]["all"]["frames"] == 3
    code, text = run_cli("convert", "--rosbag", BAG1, tmp_path / "out.hdf", "--rgb-topic", "/camera/rgb/image_color",
                         "--depth-topic", "/camera/depth_registered/image_raw")  # refused before the bag is read
    assert code == 2 and "should end in .h5 or .hdf5" in text


def test_info_on_non_mmtk_file(tmp_path):
    bad = tmp_path / "x.h5"
    bad.write_bytes(b"not hdf5 at all")
    code, text = run_cli("info", bad)
    assert code == 2 and "not a readable HDF5 file" in text


def test_real_entry_point_prints_one_line_and_exits_2(tmp_path):
    # Runs mmtk.cli.main.main() (the console script) with only this part's commands registered.
    script = ("import sys; import mmtk.cli.main as m; "
              "m._register_commands = lambda: __import__('mmtk.cli.data_cmds'); m.main()")
    proc = subprocess.run([sys.executable, "-c", script, "convert", "--rgbd", str(tmp_path / "nope"),
                           str(tmp_path / "o.h5")], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: --rgbd {tmp_path / 'nope'}: no such file or folder"]


def test_depth_statistics_keep_samples_not_frames():
    """The writer's percentile samples are copies: a view would keep every frame's valid depth alive (memory grew
    by 2 MB a frame before)."""
    from mmtk.data.format import SAMPLES_PER_FRAME, MetricStats

    stats = MetricStats()
    for _ in range(3):
        stats.update(np.random.default_rng(0).uniform(0.5, 5.0, (480, 640)).astype(np.float32))
    assert all(sample.base is None for sample in stats.samples)
    assert sum(sample.size for sample in stats.samples) <= 3 * 2 * SAMPLES_PER_FRAME  # a stride of size // 2000
