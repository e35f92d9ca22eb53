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
import mmtk.pseudo_label as pl  # noqa: E402
from mmtk.data.sources.images import fit_image  # noqa: E402

SAMPLES, FRAME = KINECT, KINECT_FRAME
CLASSES = ["floor", "wall", "laptop", "box", "carpet"]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def real_frames() -> tuple[np.ndarray, np.ndarray]:
    """Four 120x160 views (whole frame and crops) of the real PCL Kinect frame: rgb uint8, depth metres."""
    rgb = Image.open(SAMPLES / f"{FRAME}_rgb.png").convert("RGB")
    depth = Image.open(SAMPLES / f"{FRAME}_depth.png")
    boxes = [(0, 0, 640, 480), (0, 0, 320, 240), (320, 240, 640, 480), (160, 120, 480, 360)]
    rgbs = [np.array(rgb.crop(b).resize((160, 120), Image.BILINEAR)) for b in boxes]
    depths = [np.array(depth.crop(b).resize((160, 120), Image.NEAREST)).astype(np.float32) / 1000 for b in boxes]
    return np.stack(rgbs), np.stack(depths)


def write_h5(path: Path) -> None:
    """An mmtk HDF5 file (mmtk.data.H5Writer) with a 3-frame train and a 1-frame test split."""
    from mmtk.data import H5Writer

    rgb, depth = real_frames()
    with H5Writer(path, source="pcl_kinect_grabber (crops)") as writer:
        for i in range(4):
            writer.add_frame("train" if i < 3 else "test", {"rgb": rgb[i], "depth": depth[i]})


def _labels() -> dict:
    id2label = dict(enumerate(CLASSES))
    return {"num_labels": len(CLASSES), "id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}


def tiny_models() -> dict[str, tuple]:
    """Randomly initialised tiny models of every supported family, with their image processors."""
    t = transformers
    torch.manual_seed(0)
    stages = ["stage1", "stage2", "stage3", "stage4"]
    return {
        "dpt": (t.DPTForDepthEstimation(t.DPTConfig(
            hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=64,
            patch_size=16, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[16, 16, 16, 16],
            fusion_hidden_size=16, head_in_index=-1)),
            t.DPTImageProcessor(size={"height": 64, "width": 64})),
        "depth_anything": (t.DepthAnythingForDepthEstimation(t.DepthAnythingConfig(
            backbone_config=t.Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=2,
                                           image_size=56, patch_size=14, out_features=stages,
                                           reshape_hidden_states=False),
            reassemble_hidden_size=32, neck_hidden_sizes=[16, 16, 16, 16], fusion_hidden_size=16,
            head_hidden_size=16)),
            t.DPTImageProcessor(size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14)),
        "segformer": (t.SegformerForSemanticSegmentation(t.SegformerConfig(
            num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], patch_sizes=[7, 3],
            strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2], decoder_hidden_size=16, **_labels())),
            t.SegformerImageProcessor(size={"height": 64, "width": 64})),
        "upernet": (t.UperNetForSemanticSegmentation(t.UperNetConfig(
            backbone_config=t.ConvNextConfig(num_stages=4, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
                                             out_features=stages),
            hidden_size=16, auxiliary_in_channels=32, use_auxiliary_head=False, **_labels())),
            t.SegformerImageProcessor(size={"height": 64, "width": 64})),
        "mask2former": (t.Mask2FormerForUniversalSegmentation(t.Mask2FormerConfig(
            backbone_config=t.SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], image_size=64,
                                         out_features=stages),
            feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=32, dim_feedforward=32,
            encoder_layers=1, decoder_layers=2, num_attention_heads=2, num_queries=8, common_stride=4, **_labels())),
            t.Mask2FormerImageProcessor(size={"height": 64, "width": 64})),
    }


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for family, (model, processor) in tiny_models().items():
        model.save_pretrained(root / family)
        processor.save_pretrained(root / family)
        dirs[family] = root / family
    return dirs


@pytest.fixture
def h5_file(tmp_path) -> Path:
    path = tmp_path / "frames.h5"
    write_h5(path)
    return path


def reference(folder: Path, frame: np.ndarray) -> np.ndarray:
    """One frame through the model and its processor, straight from transformers (no batching, no mmtk)."""
    config = json.loads((folder / "config.json").read_text())
    model_class = {"dpt": transformers.DPTForDepthEstimation,
                   "depth_anything": transformers.DepthAnythingForDepthEstimation,
                   "segformer": transformers.SegformerForSemanticSegmentation,
                   "upernet": transformers.UperNetForSemanticSegmentation,
                   "mask2former": transformers.Mask2FormerForUniversalSegmentation}[config["model_type"]]
    model = model_class.from_pretrained(folder, local_files_only=True).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    with torch.no_grad():
        out = model(pixel_values=processor(images=frame, return_tensors="pt")["pixel_values"])
    size = [frame.shape[:2]]
    if config["model_type"] in pl.DEPTH_FAMILIES:
        return processor.post_process_depth_estimation(out, target_sizes=size)[0]["predicted_depth"].numpy()
    return processor.post_process_semantic_segmentation(out, target_sizes=size)[0].numpy()


def test_inverse_depth_becomes_relative_depth_with_median_one():
    inverse = np.array([[4.0, 2.0], [1.0, 0.0]])  # the 0 is clipped to 1% of the max (0.04)
    depth = pl.inverse_to_relative_depth(inverse)
    np.testing.assert_allclose(depth * np.median([0.25, 0.5, 1.0, 25.0]), [[0.25, 0.5], [1.0, 25.0]], rtol=1e-6)
    assert np.median(depth) == pytest.approx(1.0)
    assert not pl.inverse_to_relative_depth(np.zeros((2, 2))).any()


@pytest.mark.parametrize("family", ["dpt", "depth_anything"])
def test_depth_families(family, model_dirs, h5_file, capsys, monkeypatch):
    code, out, err = run_cli(["pseudo-label", str(h5_file), "--depth-model", str(model_dirs[family]),
                              "--batch-size", "2", "--no-progress"], capsys, monkeypatch)
    assert code == 0, err
    assert "train/depth_pseudo: 3 frames" in out and "test/depth_pseudo: 1 frames" in out
    rgb, _ = real_frames()
    with DecodedFile(h5_file) as f:
        stored = np.concatenate([f["train/depth_pseudo"][:], f["test/depth_pseudo"][:]])
        attrs = dict(f["train/depth_pseudo"].attrs)
        assert "depth_pseudo.partial" not in f["train"]
        assert f["train/depth_pseudo"].chunks == (1, 120, 160)
    assert attrs["units"] == "relative" and attrs["model_type"] == family and attrs["dtype"] == "float32"
    assert attrs["model"] == str(model_dirs[family].resolve())
    for frame, depth in zip(rgb, stored):
        expected = pl.inverse_to_relative_depth(reference(model_dirs[family], frame))
        np.testing.assert_allclose(depth, expected, rtol=1e-4, atol=1e-5)
        assert np.median(depth) == pytest.approx(1.0, rel=1e-3) and depth.std() > 0


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
    args = ["pseudo-label", str(h5_file), "--depth-model", str(model_dirs["dpt"]),
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
                            "--semseg-model", str(model_dirs["segformer"]), "--device", "cuda", "--no-progress"],
                           capsys, monkeypatch)
    assert code == 0, err
    rgb, _ = real_frames()
    with DecodedFile(h5_file) as f:
        depths = np.concatenate([f["train/depth_pseudo"][:], f["test/depth_pseudo"][:]])
        labels = np.concatenate([f["train/semseg_pseudo"][:], f["test/semseg_pseudo"][:]])
        attrs = dict(f["train/depth_pseudo"].attrs)
    assert attrs["dtype"] == "bfloat16" and attrs["device"].startswith("cuda")
    for frame, depth, label in zip(rgb, depths, labels):
        expected = pl.inverse_to_relative_depth(reference(model_dirs["dpt"], frame))
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
    run_cli(["pseudo-label", str(h5_file), "--depth-model", str(model_dirs["dpt"]), "--no-progress"],
            capsys, monkeypatch)
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
    code, _, err = run_cli(["pseudo-label", str(h5_file), "--depth-model", str(broken)], capsys, monkeypatch)
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
        np.testing.assert_array_equal(f["test/rgb"][0], fit_image(source.crop((320, 0, 640, 480)), (120, 160)))
        # 640x480 covers 160x120 exactly: a plain resize, compare with PIL's.
        np.testing.assert_array_equal(f["train/rgb"][1], np.array(source.resize((160, 120), Image.BILINEAR)))
    code, _, err = run_cli(["pseudo-label", str(out), "--depth-model", str(model_dirs["dpt"]),
                            "--semseg-model", str(model_dirs["upernet"]), "--no-progress"], capsys, monkeypatch)
    assert code == 0, err
    with DecodedFile(out) as f:
        assert f["train/depth_pseudo"].shape == (2, 120, 160) and f["test/semseg_pseudo"].shape == (1, 120, 160)
    code, _, err = run_cli(["convert", "--images", str(tmp_path / "nothing"), str(tmp_path / "x.h5")], capsys,
                           monkeypatch)
    assert code == 2 and "no such folder" in err and not (tmp_path / "x.h5").exists()
    code, _, err = run_cli(["convert", "--images", str(root), "--rosbag", str(root), str(tmp_path / "x.h5")], capsys,
                           monkeypatch)
    assert code == 2 and err.strip() == "error: give exactly one source: --rgbd FOLDER, --rosbag BAG or --images FOLDER"
    code, _, err = run_cli(["convert-images", str(root), str(tmp_path / "x.h5")], capsys, monkeypatch)
    assert code != 0 and "No such command 'convert-images'" in err    # one way to do it: `mmtk convert --images`


def test_metric_depth_anything_is_stored_in_metres(model_dirs, h5_file, tmp_path, capsys, monkeypatch):
    model, processor = tiny_models()["depth_anything"]
    metric = transformers.DepthAnythingForDepthEstimation(
        transformers.DepthAnythingConfig(**{**model.config.to_dict(), "depth_estimation_type": "metric",
                                            "max_depth": 10}))
    folder = tmp_path / "metric"
    metric.save_pretrained(folder)
    processor.save_pretrained(folder)
    code, _, err = run_cli(["pseudo-label", str(h5_file), "--depth-model", str(folder), "--no-progress"],
                           capsys, monkeypatch)
    assert code == 0, err
    rgb, _ = real_frames()
    with DecodedFile(h5_file) as f:
        assert f["test/depth_pseudo"].attrs["units"] == "m"
        stored = f["test/depth_pseudo"][0]
    expected = reference(folder, rgb[3])  # metric output, in metres (sigmoid head scaled by max_depth)
    np.testing.assert_allclose(stored, expected, rtol=1e-4, atol=1e-5)
    assert 0 < stored.min() and stored.max() <= 10.0
