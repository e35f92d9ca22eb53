"""`mmtk predict`, `mmtk export --onnx` and `mmtk export-pointcloud` on the real PCL Kinect frame."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import run_cli
from data_helpers import KINECT, KINECT_FRAME, SHARED, kinect_frame, kinect_intrinsics
from weights_helpers import save_tiny
import mmtk
from mmtk.pointcloud import depth_to_xyz, intrinsics_matrix, read_cloud
from mmtk.data.sources.frame import Frame
from mmtk.predict import decoded, input_adapters, load_predictor, predict_frame, prepare_inputs
from mmtk.visualize import colorize_labels, label_palette

FRAME = KINECT_FRAME
RGB_PNG = KINECT / f"{FRAME}_rgb.png"
DEPTH_PNG = KINECT / f"{FRAME}_depth.png"
BAG = SHARED / "rosbag_pcl_kinect" / "pcl_kinect_3frames.bag"
K = kinect_intrinsics()
TINY = dict(dim=64, depth=4, num_heads=2, image_size=(64, 96), num_classes=5)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {
        "pretrain": save_tiny(root / "pretrain.pt", **TINY, inputs=("rgb", "depth"), outputs=("rgb", "depth", "semseg"),
                              decoder_dim=32, decoder_depth=1, decoder_heads=2),
        "semseg": save_tiny(root / "semseg.pt", **TINY, head="convnext", task="semseg", inputs=("rgb", "depth"),
                            convnext_dim=256, convnext_depth=1),
        "depth": save_tiny(root / "depth.pt", **TINY, head="dpt", task="depth", inputs=("rgb", "depth"),
                           hooks=(0, 1, 2, 3), layer_dims=(16, 32, 64, 64), dpt_dim=32),
    }


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    return kinect_frame()[0]


@pytest.fixture(scope="module")
def depth_m() -> np.ndarray:
    return kinect_frame()[1]


def test_prepared_tensors_follow_the_data_contract(rgb, depth_m):
    config = SimpleNamespace(inputs=("rgb", "depth"), patch_size=16, num_classes=0)
    predictor = SimpleNamespace(config=config, input_adapters=input_adapters(config))
    inputs, valids = prepare_inputs(predictor, Frame("all", {"rgb": rgb, "depth": depth_m}), (480, 640))
    prepared, depth, valid = inputs["rgb"][0], inputs["depth"][0], valids["depth"][0]
    assert prepared.shape == (3, 480, 640)
    np.testing.assert_allclose(prepared[:, 0, 0].numpy(), (rgb[0, 0] / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225],
                               rtol=1e-5)
    values = depth_m[depth_m > 0].astype(np.float64)
    low, high = np.quantile(values, [0.1, 0.9])
    kept = values[(values >= low) & (values <= high)]
    expected = (values - kept.mean()) / np.sqrt(kept.var() + 1e-6)
    np.testing.assert_allclose(depth[0].numpy()[depth_m > 0], expected, rtol=1e-5, atol=1e-5)
    assert np.array_equal(valid[0].numpy(), depth_m > 0) and not depth[0].numpy()[depth_m == 0].any()


def test_pretrained_prediction_masks_every_target_token(checkpoints, rgb, depth_m):
    predictor = load_predictor(checkpoints["pretrain"])
    from_rgb = predict_frame(predictor, Frame("all", {"rgb": rgb}), ("depth",)).outputs["depth"]
    # Depth is requested, so the given sensor depth is entirely hidden: the prediction must not change; the
    # sensor only gives it the frame's scale (its robust mean and spread), so it comes back in metres.
    with_depth = predict_frame(predictor, Frame("all", {"rgb": rgb, "depth": depth_m}), ("depth",)).outputs["depth"]
    from mmtk.adapters.depth import robust_mean_std

    mean, std = robust_mean_std(depth_m[depth_m > 0])
    np.testing.assert_allclose(with_depth.values, np.clip(from_rgb.values * std + mean, 0, None), rtol=0, atol=1e-4)
    assert from_rgb.values.shape == (480, 640) and from_rgb.units == "relative"
    assert with_depth.units == "m" and "sensor depth" in with_depth.note and not with_depth.metres
    # Semantics alone is requested: now the depth tokens are visible and change the prediction.
    seg_rgb = predict_frame(predictor, Frame("all", {"rgb": rgb}), ("semseg",)).outputs["semseg"].values
    seg_rgbd = predict_frame(predictor, Frame("all", {"rgb": rgb, "depth": depth_m}), ("semseg",)).outputs["semseg"].values
    assert seg_rgb.shape == (480, 640) and 1 <= seg_rgb.min() and seg_rgb.max() <= 5
    assert (seg_rgb != seg_rgbd).any()


def test_predict_cli_single_image_writes_colour_maps(checkpoints, rgb, depth_m, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    code, stdout, err = run_cli(["predict", "--checkpoint", str(checkpoints["semseg"]), "--rgb", str(RGB_PNG),
                                 "--depth", str(DEPTH_PNG), "--out", str(out)], capsys, monkeypatch)
    assert code == 0, err
    labels = np.array(Image.open(out / f"{FRAME}_rgb_semseg_labels.png"))
    colours = np.array(Image.open(out / f"{FRAME}_rgb_semseg.png"))
    assert labels.shape == (480, 640) and 1 <= labels.min() and labels.max() <= 5
    assert np.array_equal(colours[:480], label_palette(6)[labels])  # the colour map, then a legend strip below
    assert colours.shape[0] > 480 and (colours[480:] == 255).mean() > 0.5
    # The labels are the argmax of the model's logits at its training size, upsampled to the frame.
    predictor = load_predictor(checkpoints["semseg"])
    direct = predict_frame(predictor, Frame("all", {"rgb": rgb, "depth": depth_m}), ("semseg",))
    assert np.array_equal(direct.outputs["semseg"].values, labels)
    assert sorted(p.name for p in out.iterdir()) == [f"{FRAME}_rgb_semseg.png", f"{FRAME}_rgb_semseg_labels.png"]


def test_predict_cli_depth_with_ply(checkpoints, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    code, _, err = run_cli(["predict", "--checkpoint", str(checkpoints["depth"]), "--rgb", str(RGB_PNG),
                            "--out", str(out), "--outputs", "depth", "--ply", "--intrinsics", "525,525,320,240"],
                           capsys, monkeypatch)
    assert code == 0, err
    depth = np.load(out / f"{FRAME}_rgb_depth.npy")
    cloud = read_cloud(out / f"{FRAME}_rgb.ply")
    valid = depth > 0
    assert len(cloud.points) == int(valid.sum()) > 0
    np.testing.assert_allclose(cloud.points, depth_to_xyz(depth, K)[valid], rtol=1e-5, atol=1e-6)


def test_predict_cli_h5_split(checkpoints, rgb, depth_m, tmp_path, capsys, monkeypatch):
    small_rgb = np.stack([rgb[::4, ::4], rgb[1::4, 1::4]])
    small_depth = np.stack([depth_m[::4, ::4], depth_m[1::4, 1::4]])
    path = tmp_path / "frames.h5"
    from mmtk.data import H5Writer

    with H5Writer(path, source="pcl_kinect_grabber (subsampled)") as writer:
        for i in range(2):
            writer.add_frame("test", {"rgb": small_rgb[i], "depth": small_depth[i]},
                             intrinsics=intrinsics_matrix(131.25, 131.25, 80, 60))
    out = tmp_path / "out"
    code, stdout, err = run_cli(["predict", "--checkpoint", str(checkpoints["pretrain"]), "--data", str(path),
                                 "--out", str(out), "--outputs", "semseg", "--ply"], capsys, monkeypatch)
    assert code == 0, err
    assert "2 frames predicted" in stdout
    for i in range(2):
        labels = np.array(Image.open(out / f"test_{i:06d}_semseg_labels.png"))
        cloud = read_cloud(out / f"test_{i:06d}.ply")  # sensor depth coloured by the predicted classes
        assert len(cloud.points) == int((small_depth[i] > 0).sum())
        assert np.array_equal(cloud.colors, label_palette(6)[labels[small_depth[i] > 0]])


def test_ply_reuses_the_label_colours_of_the_picture(rgb, depth_m, tmp_path, monkeypatch):
    import mmtk.predict as predict
    from mmtk.modality import stored_array

    labels = np.zeros(depth_m.shape, np.uint16)
    labels[:, 200:] = 3
    labels[300:, :] = 7  # classes 2 and 6 (stored + 1), 0 = unlabelled
    calls = []
    palette = predict.label_palette
    monkeypatch.setattr(predict, "label_palette", lambda n: calls.append(n) or palette(n))
    output = predict.Output("semseg", stored_array("semseg")[1], labels, num_classes=8)
    frame = Frame("all", {"rgb": rgb, "depth": depth_m}, intrinsics=K)
    written = predict.write_prediction(tmp_path, "f", frame, predict.Prediction({"semseg": output}), ply=True)
    assert [p.name for p in written] == ["f_semseg.png", "f_semseg_labels.png", "f.ply"]
    assert calls == [9, 9]  # the picture's palette and the cloud's: the same colours
    picture = np.array(Image.open(tmp_path / "f_semseg.png"))[: labels.shape[0]]
    cloud = read_cloud(tmp_path / "f.ply")
    valid = depth_m > 0
    assert len(cloud.points) == int(valid.sum())
    assert np.array_equal(cloud.colors, picture[valid]) and np.array_equal(cloud.colors, palette(9)[labels[valid]])


@pytest.mark.skipif(not BAG.is_file(), reason="../shared/data not present")
def test_predict_cli_rosbag(checkpoints, tmp_path, capsys, monkeypatch):
    from mmtk.data.sources.ros.source import open_rosbag_source

    frames = [decoded(frame) for frame in open_rosbag_source(BAG, "/camera/rgb/image_color",
                                                             "/camera/depth_registered/image_raw", max_dt=0.05).frames()]
    tiffs = sorted((SHARED / "pcl_kinect_grabber" / "tiff").glob("*_depth.tiff"))
    for frame, tiff in zip(frames, tiffs, strict=True):
        np.testing.assert_allclose(frame.arrays["depth"], np.array(Image.open(tiff)) / 1000.0, rtol=0, atol=1e-6)
        assert np.array_equal(frame.arrays["rgb"], np.array(Image.open(str(tiff).replace("_depth", "_rgb"))))
        np.testing.assert_array_equal(frame.intrinsics, K)
    out = tmp_path / "out"
    code, stdout, err = run_cli(["predict", "--checkpoint", str(checkpoints["depth"]), "--rosbag", str(BAG),
                                 "--rgb-topic", "/camera/rgb/image_color", "--depth-topic",
                                 "/camera/depth_registered/image", "--out", str(out), "--ply"],
                                capsys, monkeypatch)
    assert code == 0, err
    assert "3 frames predicted" in stdout and (out / "camera_rgb_image_color_2.ply").is_file()


@pytest.mark.parametrize("args,message", [
    (["--rgb", "{bad}"], "is corrupt or truncated"),
    (["--rgb", "{rgb}", "--ply"], "--ply needs metric depth"),
    (["--rgb", "{rgb}", "--depth", "{depth}", "--ply"], "intrinsics"),
    (["--rgb", "{rgb}", "--outputs", "rgb2"], "cannot predict"),
    (["--rgb", "{rgb}", "--images", "{bad}"], "give exactly one source"),
    (["--rosbag", "{badbag}"], "not a readable ROS1 bag"),
])
def test_predict_bad_input_is_one_line(args, message, checkpoints, tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG but not really")
    (tmp_path / "bad.bag").write_bytes(b"#ROSBAG V2.0\n but truncated")
    args = [a.format(bad=bad, badbag=tmp_path / "bad.bag", rgb=RGB_PNG, depth=DEPTH_PNG) for a in args]
    out = tmp_path / "out"
    code, _, err = run_cli(["predict", "--checkpoint", str(checkpoints["pretrain"]), "--out", str(out), *args],
                           capsys, monkeypatch)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()  # refused before anything is written


def test_predict_rejects_a_file_that_holds_no_model(tmp_path, capsys, monkeypatch):
    path = tmp_path / "weights.pt"
    torch.save({"encoder.blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, path)
    code, _, err = run_cli(["predict", "--checkpoint", str(path), "--rgb", str(RGB_PNG), "--out", str(tmp_path / "o")],
                           capsys, monkeypatch)
    assert code == 2 and "not a model checkpoint mmtk can build" in err


needs_onnx = pytest.mark.skipif(any(importlib.util.find_spec(n) is None for n in ("onnx", "onnxscript", "onnxruntime")),
                                reason="ONNX export is an optional extra (mmtk[onnx])")


@needs_onnx
@pytest.mark.parametrize("kind", ["semseg", "depth"])
def test_onnx_export_matches_pytorch_on_a_real_frame(kind, checkpoints, rgb, depth_m, tmp_path, capsys, monkeypatch):
    out = tmp_path / f"{kind}.onnx"
    code, stdout, err = run_cli(["export", str(checkpoints[kind]), "--onnx", str(out)], capsys, monkeypatch)
    assert code == 0, err
    assert "max |onnxruntime - pytorch|" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # nothing else left behind
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["mmtk_inputs"]) == ["rgb", "depth"] and json.loads(meta["mmtk_image_size"]) == [64, 96]
    # How each input is prepared, in its adapter's words.
    assert meta["mmtk_input_preparation"] == ("rgb: uint8/255 then ImageNet mean/std; depth: metres, robust per-image "
                                              "standardisation (10-90% quantile slice), invalid = 0")
    # A real frame, prepared and resized as `mmtk predict` does, through both runtimes.
    predictor = load_predictor(checkpoints[kind])
    inputs, _ = prepare_inputs(predictor, Frame("all", {"rgb": rgb, "depth": depth_m}), (64, 96))
    with torch.inference_mode():
        expected = predictor.model(inputs).numpy()
    import onnxruntime

    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {name: tensor.numpy() for name, tensor in inputs.items()})[0]
    assert got.shape == expected.shape == ((1, 5, 64, 96) if kind == "semseg" else (1, 1, 64, 96))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))


def test_export_inputs_follow_the_adapters():
    from mmtk.export import example_inputs

    assert [t.shape[1] for t in example_inputs(("rgb", "depth", "xyz"), (32, 48))] == [3, 1, 3]
    with pytest.raises(mmtk.MmtkError, match="dense full-resolution inputs .*not 'semseg'"):
        example_inputs(("rgb", "semseg"), (32, 48))


def test_export_refuses_pretraining_checkpoints_and_leaves_no_file(checkpoints, tmp_path, capsys, monkeypatch):
    out = tmp_path / "model.onnx"
    code, _, err = run_cli(["export", str(checkpoints["pretrain"]), "--onnx", str(out)], capsys, monkeypatch)
    assert code == 2 and "pretraining checkpoint" in err
    code, _, err = run_cli(["export", str(checkpoints["semseg"]), "--onnx", str(tmp_path / "model.bin")],
                           capsys, monkeypatch)
    assert code == 2 and ".onnx" in err
    find_spec = importlib.util.find_spec  # without the optional extra: one line saying what to install
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else find_spec(name, *a))
    code, _, err = run_cli(["export", str(checkpoints["semseg"]), "--onnx", str(out)], capsys, monkeypatch)
    assert code == 2 and "needs onnxscript; install them with `pip install mmtk[onnx]`" in err
    assert list(tmp_path.iterdir()) == []


def test_export_pointcloud_from_images_and_h5(rgb, depth_m, tmp_path, capsys, monkeypatch):
    out = tmp_path / "frame.pcd"
    code, stdout, err = run_cli(["export-pointcloud", str(out), "--rgb", str(RGB_PNG), "--depth", str(DEPTH_PNG),
                                 "--intrinsics", "525,525,320,240"], capsys, monkeypatch)
    assert code == 0, err
    assert "271575 points written (35625 pixels without depth skipped)" in stdout
    pcd = read_cloud(KINECT / f"{FRAME}.pcd").finite()
    cloud = read_cloud(out)
    np.testing.assert_allclose(cloud.points, pcd.points, rtol=0, atol=1e-6)  # same as PCL's own cloud
    assert np.array_equal(cloud.colors, pcd.colors)

    labels = np.zeros((120, 160), np.uint8)
    labels[:, 80:] = 2
    path = tmp_path / "frames.h5"
    from mmtk.data import H5Writer

    with H5Writer(path, source="pcl_kinect_grabber (subsampled)") as writer:
        writer.add_frame("test", {"rgb": np.ascontiguousarray(rgb[::4, ::4]), "depth": depth_m[::4, ::4]})
    with h5py.File(path, "r+") as f:  # as `mmtk pseudo-label` adds them
        g = f["test"]
        g["semseg_pseudo"] = labels[None]
        g["semseg_pseudo"].attrs["classes"] = json.dumps(["floor", "box"])
        g["depth_pseudo"] = np.ones((1, 120, 160), np.float32)
        g["depth_pseudo"].attrs["units"] = "relative"
    ply = tmp_path / "labels.ply"
    no_k = run_cli(["export-pointcloud", str(ply), "--h5", str(path), "--color", "semseg_pseudo"], capsys, monkeypatch)
    assert no_k[0] == 2 and "no camera intrinsics" in no_k[2] and not ply.exists()
    relative = run_cli(["export-pointcloud", str(ply), "--h5", str(path), "--depth-key", "depth_pseudo",
                        "--intrinsics", "131.25,131.25,80,60"], capsys, monkeypatch)
    assert relative[0] == 2 and "not metres" in relative[2] and not ply.exists()
    code, _, err = run_cli(["export-pointcloud", str(ply), "--h5", str(path), "--color", "semseg_pseudo",
                            "--intrinsics", "131.25,131.25,80,60"], capsys, monkeypatch)
    assert code == 0, err
    cloud = read_cloud(ply)
    valid = depth_m[::4, ::4] > 0
    assert np.array_equal(cloud.colors, colorize_labels(labels, 3)[valid])
    assert set(map(tuple, cloud.colors)) == {(0, 0, 0), tuple(label_palette(3)[2])}
    code, _, err = run_cli(["export-pointcloud", str(tmp_path / "plain.ply"), "--h5", str(path), "--color", "none",
                            "--intrinsics", "131.25,131.25,80,60"], capsys, monkeypatch)
    assert code == 0, err
    plain = read_cloud(tmp_path / "plain.ply")
    assert len(plain.points) == valid.sum() and (plain.colors is None or len(plain.colors) == 0)
    code, _, err = run_cli(["export-pointcloud", str(tmp_path / "bad.ply"), "--h5", str(path), "--color", "depth",
                            "--intrinsics", "131.25,131.25,80,60"], capsys, monkeypatch)
    assert code == 2 and "--color depth: a float32 array of shape [120, 160] is neither" in err and not (tmp_path / "bad.ply").exists()
