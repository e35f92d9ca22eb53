"""`mmtk pseudo-label` with tiny randomly initialised models of every supported family, on real frames."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

transformers = pytest.importorskip("transformers")
import torch  # noqa: E402

from cli_helpers import run_cli
from data_helpers import DecodedFile, KINECT, KINECT_FRAME
from helpers import needs_cuda
from pseudo_helpers import CLASSES, expected_depth, real_frames, reference, save_models, tiny_models, write_h5
import mmtk.pseudo_label as pl  # noqa: E402
from mmtk.data.resize import resize_stored  # noqa: E402

SAMPLES, FRAME = KINECT, KINECT_FRAME


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    return save_models(tmp_path_factory.mktemp("models"))


@pytest.fixture
def h5_file(tmp_path) -> Path:
    path = tmp_path / "frames.h5"
    write_h5(path)
    return path


def test_stored_depth_by_kind():
    """Relative kinds are divided by the median of the positive outputs, metres are kept; <= 0 is invalid (0)."""
    output = np.array([[4.0, 2.0], [1.0, 0.0], [-1.0, np.nan]])
    for name in ("depth", "relative-inverse"):
        stored = pl.store_depth(output, pl.DEPTH_KINDS[name])
        np.testing.assert_allclose(stored, [[2.0, 1.0], [0.5, 0.0], [0.0, 0.0]])
        assert stored.dtype == np.float32
    np.testing.assert_array_equal(pl.store_depth(output, pl.DEPTH_KINDS["metric"]), [[4, 2], [1, 0], [0, 0]])
    assert not pl.store_depth(np.zeros((2, 2)), pl.DEPTH_KINDS["depth"]).any()


# (model folder, --depth-kind given, kind stored, units attr): the kind comes from the model's config where it says
DEPTH_CASES = [
    ("dpt", "depth", "depth", "relative"),  # Omnidata-style DPT: its config cannot say
    ("dpt", "relative-inverse", "relative-inverse", "relative-inverse"),  # MiDaS / DPT-Large
    ("depth_anything", None, "relative-inverse", "relative-inverse"),  # depth_estimation_type: relative
    ("depth_anything_metric", None, "metric", "m"),  # depth_estimation_type: metric
    ("zoedepth", None, "metric", "m"),  # ZoeDepth is metric
]


@pytest.mark.parametrize("folder,given,kind,units", DEPTH_CASES)
def test_depth_kinds(folder, given, kind, units, model_dirs, h5_file, capsys, monkeypatch):
    code, out, err = run_cli(["pseudo-label", str(h5_file), "--depth-model", str(model_dirs[folder]),
                              *(["--depth-kind", given] if given else []), "--batch-size", "2", "--no-progress"],
                             capsys, monkeypatch)
    assert code == 0, err
    assert "train/depth_pseudo: 3 frames" in out and "test/depth_pseudo: 1 frame" in out
    rgb, _ = real_frames()
    with DecodedFile(h5_file) as f:
        stored = np.concatenate([f["train/depth_pseudo"][:], f["test/depth_pseudo"][:]])
        attrs = dict(f["train/depth_pseudo"].attrs)
        assert "depth_pseudo.partial" not in f["train"]
        assert f["train/depth_pseudo"].chunks == (1, 120, 160)
    assert attrs["units"] == units and attrs["depth_kind"] == kind and attrs["dtype"] == "float32"
    assert attrs["model"] == str(model_dirs[folder].resolve())
    assert ("median" in attrs["normalisation"]) == (units != "m")
    for frame, depth in zip(rgb, stored):
        expected = expected_depth(reference(model_dirs[folder], frame), units)
        # batched vs one frame: float noise, which these large random weights amplify; 1e-4 of the frame's range
        np.testing.assert_allclose(depth, expected, rtol=1e-3, atol=1e-4 * expected.max())
        assert depth.min() >= 0 and depth.max() > 0


def test_depth_kind_is_required_where_the_config_is_silent(model_dirs, h5_file, capsys, monkeypatch):
    before = h5_file.read_bytes()
    code, _, err = run_cli(["pseudo-label", str(h5_file), "--depth-model", str(model_dirs["dpt"])], capsys,
                           monkeypatch)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--depth-kind (depth, relative-inverse, metric)" in err and "Omnidata DPT" in err
    code, _, err = run_cli(["pseudo-label", str(h5_file), "--depth-model", str(model_dirs["depth_anything"]),
                            "--depth-kind", "metric"], capsys, monkeypatch)
    assert code == 2 and "outputs relative-inverse, not metric; drop --depth-kind" in err
    code, _, err = run_cli(["pseudo-label", str(h5_file), "--depth-model", str(model_dirs["dpt"]),
                            "--depth-kind", "disparity"], capsys, monkeypatch)
    assert code == 2 and "--depth-kind disparity: unknown; choose one of depth, relative-inverse, metric" in err
    code, _, err = run_cli(["pseudo-label", str(h5_file), "--semseg-model", str(model_dirs["segformer"]),
                            "--depth-kind", "depth"], capsys, monkeypatch)
    assert code == 2 and "give --depth-model too" in err
    assert h5_file.read_bytes() == before


@pytest.mark.parametrize("family", ["segformer", "upernet", "mask2former"])
def test_semseg_families(family, model_dirs, h5_file, capsys, monkeypatch):
    code, out, err = run_cli(["pseudo-label", str(h5_file), "--semseg-model", str(model_dirs[family]),
                              "--batch-size", "3", "--no-progress"], capsys, monkeypatch)
    assert code == 0, err
    rgb, _ = real_frames()
    with DecodedFile(h5_file) as f:
        stored = np.concatenate([f["train/semseg_pseudo"][:], f["test/semseg_pseudo"][:]])
        assert json.loads(f["test/semseg_pseudo"].attrs["classes"]) == CLASSES
        assert f["test/semseg_pseudo"].dtype == np.uint8
    for frame, labels in zip(rgb, stored):
        expected = reference(model_dirs[family], frame) + 1  # label k is class k-1; 0 = unlabeled
        assert (labels == expected).mean() > 0.999
        assert labels.min() >= 1 and labels.max() <= len(CLASSES)


def test_both_models_in_one_run_then_skip_when_complete(model_dirs, h5_file, capsys, monkeypatch):
    args = ["pseudo-label", str(h5_file), "--depth-model", str(model_dirs["dpt"]), "--depth-kind", "depth",
            "--semseg-model", str(model_dirs["segformer"]), "--no-progress"]
    assert run_cli(args, capsys, monkeypatch)[0] == 0
    with DecodedFile(h5_file) as f:
        first = f["train/depth_pseudo"][:]
        assert {"rgb", "depth", "depth_pseudo", "semseg_pseudo"} == set(f["train"])
    code, out, _ = run_cli(args, capsys, monkeypatch)
    assert code == 0 and out.count("already complete") == 4
    with DecodedFile(h5_file) as f:
        np.testing.assert_array_equal(f["train/depth_pseudo"][:], first)


@needs_cuda
def test_bf16_on_cuda_agrees_with_fp32(model_dirs, h5_file, capsys, monkeypatch):
    """On a GPU the models run in bfloat16 (the default): close to the float32 reference, recorded as such."""
    code, _, err = run_cli(["pseudo-label", str(h5_file), "--depth-model", str(model_dirs["dpt"]),
                            "--depth-kind", "relative-inverse", "--semseg-model", str(model_dirs["segformer"]),
                            "--device", "cuda", "--no-progress"],
                           capsys, monkeypatch)
    assert code == 0, err
    rgb, _ = real_frames()
    with DecodedFile(h5_file) as f:
        depths = np.concatenate([f["train/depth_pseudo"][:], f["test/depth_pseudo"][:]])
        labels = np.concatenate([f["train/semseg_pseudo"][:], f["test/semseg_pseudo"][:]])
        attrs = dict(f["train/depth_pseudo"].attrs)
    assert attrs["dtype"] == "bfloat16" and attrs["device"].startswith("cuda")
    for frame, depth, label in zip(rgb, depths, labels):
        expected = expected_depth(reference(model_dirs["dpt"], frame), "relative-inverse")
        assert np.median(np.abs(depth - expected) / np.maximum(expected, 1e-6)) < 0.05
        assert (label == reference(model_dirs["segformer"], frame) + 1).mean() > 0.8


def test_interrupted_run_resumes_where_it_stopped(model_dirs, h5_file, tmp_path, capsys, monkeypatch):
    args = ["pseudo-label", str(h5_file), "--depth-model", str(model_dirs["depth_anything"]),
            "--batch-size", "1", "--no-progress"]
    uninterrupted = tmp_path / "uninterrupted.h5"
    write_h5(uninterrupted)
    assert run_cli([args[0], str(uninterrupted), *args[2:]], capsys, monkeypatch)[0] == 0

    real_write = pl._write_batch
    calls = []

    def write_then_interrupt(dataset, first, values):
        real_write(dataset, first, values)
        calls.append(first)
        if len(calls) == 2:  # splits go in name order: test (1 frame) is complete, train has 1 of 3
            raise KeyboardInterrupt

    monkeypatch.setattr(pl, "_write_batch", write_then_interrupt)
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 130 and "run the same command again to resume" in err
    with DecodedFile(h5_file) as f:
        assert "depth_pseudo" not in f["train"]  # never under its final name while incomplete
        assert f["train/depth_pseudo.partial"].attrs["frames_done"] == 1
        assert "depth_pseudo" in f["test"]
    monkeypatch.setattr(pl, "_write_batch", real_write)
    code, out, _ = run_cli(args, capsys, monkeypatch)
    assert code == 0 and "resuming at frame 1 of 3" in out and "train/depth_pseudo: 2 frames" in out
    assert "test/depth_pseudo: already complete" in out
    with DecodedFile(h5_file) as f, DecodedFile(uninterrupted) as g:
        assert "depth_pseudo.partial" not in f["train"]
        for split in ("train", "test"):
            np.testing.assert_array_equal(f[f"{split}/depth_pseudo"][:], g[f"{split}/depth_pseudo"][:])


def test_resume_with_another_model_is_refused(model_dirs, h5_file, capsys, monkeypatch):
    def interrupt(dataset, first, values):
        raise KeyboardInterrupt

    monkeypatch.setattr(pl, "_write_batch", interrupt)
    run_cli(["pseudo-label", str(h5_file), "--depth-model", str(model_dirs["dpt"]), "--depth-kind", "depth",
             "--no-progress"], capsys, monkeypatch)
    monkeypatch.undo()
    code, _, err = run_cli(["pseudo-label", str(h5_file), "--depth-model", str(model_dirs["depth_anything"]),
                            "--no-progress"], capsys, monkeypatch)
    assert code == 2 and "another model" in err and "--overwrite" in err


@pytest.mark.parametrize("option,family,message", [
    ("--depth-model", "segformer", "cannot be used for depth"),
    ("--semseg-model", "dpt", "cannot be used for semseg"),
    ("--depth-model", "missing", "no such folder"),
])
def test_wrong_or_missing_model_folder_is_a_one_line_error(option, family, message, model_dirs, h5_file, tmp_path,
                                                           capsys, monkeypatch):
    folder = model_dirs.get(family, tmp_path / "missing")
    before = h5_file.read_bytes()
    code, out, err = run_cli(["pseudo-label", str(h5_file), option, str(folder)], capsys, monkeypatch)
    assert code == 2 and err.startswith("error: ") and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert h5_file.read_bytes() == before


def test_folder_without_processor_or_with_broken_weights(model_dirs, h5_file, tmp_path, capsys, monkeypatch):
    import shutil

    no_processor = tmp_path / "no_processor"
    shutil.copytree(model_dirs["dpt"], no_processor)
    (no_processor / "preprocessor_config.json").unlink()
    code, _, err = run_cli(["pseudo-label", str(h5_file), "--depth-model", str(no_processor)], capsys, monkeypatch)
    assert code == 2 and "preprocessor_config.json" in err
    broken = tmp_path / "broken"
    shutil.copytree(model_dirs["dpt"], broken)
    (broken / "model.safetensors").write_bytes(b"garbage")
    code, _, err = run_cli(["pseudo-label", str(h5_file), "--depth-model", str(broken), "--depth-kind", "depth"],
                           capsys, monkeypatch)
    assert code == 2 and "cannot load the dpt model" in err and len(err.strip().splitlines()) == 1


def test_convert_images_then_pseudo_label_from_rgb_alone(model_dirs, tmp_path, capsys, monkeypatch):
    source = Image.open(SAMPLES / f"{FRAME}_rgb.png").convert("RGB")
    root = tmp_path / "images"
    for rel, box in (("train/laptop/a.png", (0, 0, 640, 480)), ("train/box/b.jpg", (100, 50, 420, 450)),
                     ("val/laptop/c.png", (320, 0, 640, 480))):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        source.crop(box).save(root / rel)
    (root / "train/box/broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "rgb.h5"
    code, stdout, err = run_cli(["convert", "--images", str(root), str(out), "--size", "120x160", "--no-progress"],
                                capsys, monkeypatch)
    assert code == 0, err
    assert "train: 2" in stdout and "test: 1" in stdout and "skipped 1 unreadable" in stdout
    with DecodedFile(out) as f:
        assert f.attrs["mmtk_format"] >= 1 and set(f) == {"train", "test"}
        assert [s.decode() for s in f["train/frame_id"][:]] == ["box/b.jpg", "laptop/a.png"]
        # --size means what it means for every source: the 320x480 crop keeps its aspect ratio, so its centred
        # 320x240 window (rows 120-359) is resized to 160x120; the 640x480 image is a plain resize
        portrait = np.array(source.crop((320, 0, 640, 480)))
        np.testing.assert_array_equal(f["test/rgb"][0], resize_stored("image", portrait[120:360], (120, 160)))
        np.testing.assert_array_equal(f["train/rgb"][1], resize_stored("image", np.array(source), (120, 160)))
    code, _, err = run_cli(["pseudo-label", str(out), "--depth-model", str(model_dirs["dpt"]), "--depth-kind", "depth",
                            "--semseg-model", str(model_dirs["upernet"]), "--no-progress"], capsys, monkeypatch)
    assert code == 0, err
    with DecodedFile(out) as f:
        assert f["train/depth_pseudo"].shape == (2, 120, 160) and f["test/semseg_pseudo"].shape == (1, 120, 160)
    code, _, err = run_cli(["convert", "--images", str(tmp_path / "nothing"), str(tmp_path / "x.h5")], capsys,
                           monkeypatch)
    assert code == 2 and "no such file or folder" in err and not (tmp_path / "x.h5").exists()
    code, _, err = run_cli(["convert", "--images", str(root), "--rosbag", str(root), str(tmp_path / "x.h5")], capsys,
                           monkeypatch)
    assert code == 2 and err.strip() == "error: give exactly one source: --rgbd FOLDER, --rosbag BAG or --images FOLDER"
    code, _, err = run_cli(["convert-images", str(root), str(tmp_path / "x.h5")], capsys, monkeypatch)
    assert code != 0 and "No such command 'convert-images'" in err    # one way to do it: `mmtk convert --images`
