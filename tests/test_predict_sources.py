"""`mmtk predict` takes every source `mmtk convert` takes and prepares inputs through their adapters.

On the shipped ROS1 bag (two real Kinect frames): predictions written back as a ROS1 bag and as an MCAP file, read
back with rosbags, one message per frame, stamped and framed like the colour image; a plugin input modality
(`thermal`, defined in this file, stands in for a thermal camera: its frames are DERIVED from the real colour frames,
see tests/test_plugin_modality.py) given as a bag topic and as a dataset field; an RGB-D folder and an image folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mmtk
import mmtk.plugins
from cli_helpers import run_cli
from data_helpers import BAG1, DEPTH_TOPIC, MULTIMAE, RGB_TOPIC, SYNC
from weights_helpers import save_tiny
from mmtk.data.sources.frame import Frame
from mmtk.predict import decoded, load_predictor, predict_frame
from mmtk.visualize import label_palette
from test_plugin_modality import IR_ADAPTER, IR_TOPIC, write_bag_with_ir

TINY = dict(dim=64, depth=4, num_heads=2, image_size=(64, 96), num_classes=5, decoder_dim=32, decoder_depth=1,
            decoder_heads=2, outputs=("depth", "semseg"))
THERMAL_ADAPTER = IR_ADAPTER.replace('"ir"', '"thermal"').replace("Infrared", "Thermal")


@pytest.fixture(scope="module")
def rgbd_model(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("rgbd") / "pretrain.pt", **TINY, inputs=("rgb", "depth"))


def input_headers() -> list[tuple[int, int, str]]:
    """(sec, nanosec, frame_id) of the shipped bag's colour messages, read with rosbags directly."""
    from rosbags.highlevel import AnyReader

    with AnyReader([BAG1]) as reader:
        conns = [c for c in reader.connections if c.topic == RGB_TOPIC]
        headers = [reader.deserialize(raw, c.msgtype).header for c, _, raw in reader.messages(connections=conns)]
    return [(h.stamp.sec, h.stamp.nanosec, h.frame_id) for h in headers]


def read_back(path: Path) -> dict[str, list]:
    """Every message of a bag or MCAP file by topic, deserialized by rosbags."""
    from rosbags.highlevel import AnyReader

    topics: dict[str, list] = {}
    with AnyReader([path]) as reader:
        for conn, stamp, raw in reader.messages():
            msg = reader.deserialize(raw, conn.msgtype)
            topics.setdefault(conn.topic, []).append((conn.msgtype, stamp, msg))
    return topics


@pytest.mark.parametrize("suffix", [".bag", ".mcap"])
def test_bag_predictions_are_stamped_and_framed_like_their_inputs(suffix, rgbd_model, tmp_path, capsys, monkeypatch):
    out = tmp_path / f"pred{suffix}"
    code, stdout, err = run_cli(["predict", "--checkpoint", rgbd_model, "--rosbag", BAG1, "--rgb-topic", RGB_TOPIC,
                                 "--depth-topic", DEPTH_TOPIC, "--out", out], capsys, monkeypatch)
    assert code == 0, err
    assert "2 frames predicted" in stdout and sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    topics = read_back(out)
    assert sorted(topics) == ["/mmtk/depth", "/mmtk/points", "/mmtk/semseg", "/mmtk/semseg/color"]
    headers = input_headers()
    for topic, messages in topics.items():
        assert len(messages) == 2, topic  # one message per input frame
        for (_, stamp, msg), (sec, nanosec, frame_id) in zip(messages, headers, strict=True):
            assert (msg.header.stamp.sec, msg.header.stamp.nanosec, msg.header.frame_id) == (sec, nanosec, frame_id)
            assert stamp == sec * 10**9 + nanosec

    # The messages hold what predict_frame gives on the bag's frames: labels, depth in metres, labelled points.
    from mmtk.data.sources.ros.source import open_rosbag_source

    frames = [decoded(frame) for frame in open_rosbag_source(BAG1, RGB_TOPIC, DEPTH_TOPIC).frames()]
    predictor = load_predictor(rgbd_model)
    for i, frame in enumerate(frames):
        expected = predict_frame(predictor, frame, ("depth", "semseg")).outputs
        _, _, semseg = topics["/mmtk/semseg"][i]
        _, _, depth = topics["/mmtk/depth"][i]
        _, _, cloud = topics["/mmtk/points"][i]
        labels = np.asarray(semseg.data).reshape(480, 640)
        assert semseg.encoding == "mono8" and np.array_equal(labels, expected["semseg"].values)
        assert depth.encoding == "32FC1"
        metres = np.asarray(depth.data).view("<f4").reshape(480, 640)
        np.testing.assert_array_equal(metres, expected["depth"].values)
        assert 0.3 < np.median(metres[metres > 0]) < 10  # scaled to the sensor depth: metres, not relative
        colour = np.asarray(topics["/mmtk/semseg/color"][i][2].data).reshape(480, 640, 3)
        assert np.array_equal(colour, label_palette(6)[labels])
        from mmtk.data.sources.ros.clouds import pointcloud2_to_cloud

        points = pointcloud2_to_cloud(cloud)
        valid = frame.arrays["depth"] > 0  # the sensor's depth: the prediction was only rescaled to it
        assert len(points.points) == int(valid.sum())
        np.testing.assert_allclose(points.points[:, 2], frame.arrays["depth"][valid], rtol=1e-6)
        assert np.array_equal(points.colors, label_palette(6)[labels[valid]])
        fields = {f.name: f for f in cloud.fields}
        point_labels = np.asarray(cloud.data).reshape(-1, cloud.point_step)[:, fields["label"].offset:][:, :2]
        assert np.array_equal(np.ascontiguousarray(point_labels).view("<u2")[:, 0], labels[valid])


def write_unstamped_bag(out: Path) -> list[tuple[int, str]]:
    """The sample bag with every header stamp 0 (a driver that never sets them), messages logged as recorded;
    returns (log time ns, frame_id) of its colour messages."""
    from dataclasses import replace

    from rosbags.highlevel import AnyReader
    from rosbags.rosbag1 import Writer
    from rosbags.typesys import Stores, get_typestore

    store, colour = get_typestore(Stores.ROS1_NOETIC), []
    with AnyReader([BAG1]) as reader, Writer(out) as writer:
        conns = {c.id: writer.add_connection(c.topic, c.msgtype, typestore=store) for c in reader.connections}
        for conn, log_time, raw in reader.messages():
            msg = reader.deserialize(raw, conn.msgtype)
            msg = replace(msg, header=replace(msg.header, stamp=replace(msg.header.stamp, sec=0, nanosec=0)))
            writer.write(conns[conn.id], log_time, store.serialize_ros1(msg, conn.msgtype))
            if conn.topic == RGB_TOPIC:
                colour.append((log_time, msg.header.frame_id))
    return colour


@pytest.mark.parametrize("suffix", [".bag", ".mcap"])
def test_predictions_of_a_bag_without_stamps_keep_its_zero_stamps_and_log_times(suffix, rgbd_model, tmp_path,
                                                                                 capsys, monkeypatch):
    """The writer looked each frame's header up again by non-zero stamp: a bag whose stamps were never set failed.
    Every prediction now carries its colour message's header as recorded, and is logged when that message was."""
    bag = tmp_path / "unstamped.bag"
    colour = write_unstamped_bag(bag)
    out = tmp_path / f"pred{suffix}"
    code, stdout, err = run_cli(["predict", "--checkpoint", rgbd_model, "--rosbag", bag, "--rgb-topic", RGB_TOPIC,
                                 "--depth-topic", DEPTH_TOPIC, "--out", out], capsys, monkeypatch)
    assert code == 0, err
    assert "2 frames predicted" in stdout and len(colour) == 2
    topics = read_back(out)
    assert sorted(topics) == ["/mmtk/depth", "/mmtk/points", "/mmtk/semseg", "/mmtk/semseg/color"]
    for topic, messages in topics.items():
        assert [(log_time, msg.header.frame_id) for _, log_time, msg in messages] == colour, topic
        assert all((msg.header.stamp.sec, msg.header.stamp.nanosec) == (0, 0) for _, _, msg in messages), topic


def test_checkpoint_is_a_file_a_model_folder_or_a_run_folder(rgbd_model, tmp_path, capsys, monkeypatch):
    """--checkpoint takes the weights file, the model folder `mmtk weights --to` writes from it, and a run folder
    holding it as last.pt: the same model each time, so the same predictions."""
    import shutil

    folder, run = tmp_path / "model", tmp_path / "run"
    code, _, err = run_cli(["weights", rgbd_model, "--to", folder], capsys, monkeypatch)
    assert code == 0 and (folder / "config.json").is_file(), err
    run.mkdir()
    shutil.copy(rgbd_model, run / "last.pt")
    image = MULTIMAE / "train" / "rgb" / "data" / "0000.png"
    predictions = []
    for name, checkpoint in (("file", rgbd_model), ("folder", folder), ("run", run)):
        code, stdout, err = run_cli(["predict", "--checkpoint", checkpoint, "--rgb", image, "--outputs", "semseg",
                                     "--out", tmp_path / name], capsys, monkeypatch)
        assert code == 0 and "1 frame predicted" in stdout, err
        predictions.append(np.array(Image.open(tmp_path / name / "0000_semseg_labels.png")))
    assert all(np.array_equal(predictions[0], other) for other in predictions[1:])
    code, _, err = run_cli(["predict", "--checkpoint", tmp_path / "empty", "--rgb", image, "--out", tmp_path / "x"],
                           capsys, monkeypatch)
    assert code == 2 and "no such file or folder" in err


def test_bag_output_needs_a_bag_source(rgbd_model, tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(["predict", "--checkpoint", rgbd_model, "--rgbd", MULTIMAE, "--out", tmp_path / "p.mcap"],
                           capsys, monkeypatch)
    assert code == 2 and "give --rosbag BAG" in err and not (tmp_path / "p.mcap").exists()


@pytest.fixture(scope="module")
def thermal(tmp_path_factory):
    """A thermal adapter file, a bag with a thermal topic, a model taking rgb + thermal, and the bag converted."""
    folder = tmp_path_factory.mktemp("thermal")
    plugin = folder / "thermal_adapter.py"
    plugin.write_text(THERMAL_ADAPTER)
    mmtk.plugins.load_plugin(plugin)
    bag = folder / "kinect_thermal.bag"
    write_bag_with_ir(bag)
    model = save_tiny(folder / "thermal.pt", **TINY, inputs=("rgb", "thermal"))
    return folder, plugin, bag, model


def test_a_plugin_input_modality_predicts_from_a_bag_and_from_its_dataset(thermal, capsys, monkeypatch):
    folder, plugin, bag, model = thermal
    topics = ["--rosbag", bag, "--rgb-topic", RGB_TOPIC, "--depth-topic", DEPTH_TOPIC, "--topic",
              f"thermal={IR_TOPIC}", "--plugin", plugin]
    code, _, err = run_cli(["predict", "--checkpoint", model, *topics, "--outputs", "semseg", "--out",
                            folder / "from_bag"], capsys, monkeypatch)
    assert code == 0, err
    data = folder / "kinect_thermal.h5"
    code, _, err = run_cli(["convert", *topics, data, "--no-progress"], capsys, monkeypatch)
    assert code == 0, err
    code, stdout, err = run_cli(["predict", "--checkpoint", model, "--data", data, "--split", "all", "--plugin", plugin,
                                 "--outputs", "semseg", "--out", folder / "from_data"], capsys, monkeypatch)
    assert code == 0, err
    assert "2 frames predicted" in stdout
    from_bag = sorted((folder / "from_bag").glob("*_semseg_labels.png"))
    from_data = sorted((folder / "from_data").glob("*_semseg_labels.png"))
    assert [p.name for p in from_bag] == [p.name for p in from_data] and len(from_bag) == 2
    # The same frames through the same adapters: the same predictions, from the bag and from its dataset.
    predictor = load_predictor(model)
    for bag_file, data_file in zip(from_bag, from_data):
        labels = np.array(Image.open(bag_file))
        assert np.array_equal(labels, np.array(Image.open(data_file)))
    # The thermal image is an input that counts: without it (rgb alone) the prediction differs.
    from mmtk.data.sources.ros.source import open_rosbag_source

    frame = next(open_rosbag_source(bag, RGB_TOPIC, DEPTH_TOPIC, extra_topics={"thermal": IR_TOPIC}).frames())
    both = predict_frame(predictor, frame, ("semseg",)).outputs["semseg"].values
    rgb_only = predict_frame(predictor, Frame("all", {"rgb": frame.arrays["rgb"]}), ("semseg",)).outputs["semseg"]
    assert np.array_equal(both, np.array(Image.open(from_bag[0]))) and (both != rgb_only.values).any()


def test_a_model_whose_inputs_the_source_lacks_is_one_line(thermal, capsys, monkeypatch, tmp_path):
    folder, plugin, _, _ = thermal
    model = save_tiny(tmp_path / "thermal_only.pt", **TINY, inputs=("thermal",))
    code, _, err = run_cli(["predict", "--checkpoint", model, "--images", SYNC / "rgb", "--plugin", plugin,
                            "--out", tmp_path / "out"], capsys, monkeypatch)
    assert code == 2 and "the model takes ['thermal'] but frame rgb_00000.jpg holds ['rgb']" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    code, _, err = run_cli(["predict", "--checkpoint", model, "--rosbag", BAG1, "--rgb-topic", RGB_TOPIC, "--plugin",
                            plugin, "--out", tmp_path / "out.mcap"], capsys, monkeypatch)  # fails inside the open bag: nothing is left
    assert code == 2 and "the model takes ['thermal']" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thermal_only.pt"]


def test_rgbd_folder_and_image_folder(rgbd_model, tmp_path, capsys, monkeypatch):
    out = tmp_path / "rgbd"
    code, stdout, err = run_cli(["predict", "--checkpoint", rgbd_model, "--rgbd", MULTIMAE, "--out", out], capsys,
                                monkeypatch)
    assert code == 0, err
    from mmtk.data.sources.folders import open_rgbd_source

    frames = list(open_rgbd_source(MULTIMAE).frames())
    assert f"{len(frames)} frames predicted" in stdout and len(frames) == 2
    predictor = load_predictor(rgbd_model)
    for frame in frames:  # the folder's depth gives the relative prediction its scale: metres
        stem = str(frame.frame_id).replace("/", "_").removesuffix(".png")
        expected = predict_frame(predictor, frame, ("depth", "semseg")).outputs
        np.testing.assert_array_equal(np.load(out / f"{stem}_depth.npy"), expected["depth"].values)
        assert np.array_equal(np.array(Image.open(out / f"{stem}_semseg_labels.png")), expected["semseg"].values)

    out = tmp_path / "images"
    code, stdout, err = run_cli(["predict", "--checkpoint", rgbd_model, "--images", SYNC / "rgb", "--out", out],
                                capsys, monkeypatch)
    assert code == 0, err
    assert "3 frames predicted" in stdout
    assert sorted(p.name for p in out.glob("*_depth_relative.npy")) == [
        f"rgb_{i:05d}_depth_relative.npy" for i in (0, 50, 100)]  # no depth: no scale, written as relative
