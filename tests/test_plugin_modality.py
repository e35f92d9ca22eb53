"""A sensor mmtk does not know, from bag to evaluation, with nothing but a plugin file and the CLI.

The modality `ir` (a single-channel 16-bit infrared image) is defined in this test file and handed to every
command with `--plugin`; no file under mmtk/, adapters/ or cli/ names it. Its frames are DERIVED from the real
Kinect frames shipped in samples/ (the sample bag has no infrared camera): ir = 256 x the colour image's
luminance, as a uint16 mono16 image stamped like the colour image it came from.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from data_helpers import BAG1, DEPTH_TOPIC, RGB_TOPIC, DecodedFile
from engine_helpers import CLI, ONE_THREAD_ENV, RECIPES, TINY, TINY_DEPTH, run_cli

IR_TOPIC = "/camera/ir/image_raw"
IR_ADAPTER = '''
"""Infrared: one 16-bit channel, standardised per image; L1 on hidden patches."""
import numpy as np
import torch

from mmtk.modality import Modality, StoredArray, register_modality
from mmtk.data.resize import resize_stored
from mmtk.data.transforms import flip_width


@register_modality
class Infrared(Modality):
    name = "ir"
    channels = 1
    stores = (StoredArray("ir", "image", ("uint16",), "raw sensor counts"),)

    def load(self, read, window, image_size):
        counts = resize_stored("image", read("ir"), image_size).astype(np.float32)
        x = torch.from_numpy((counts - counts.mean()) / (counts.std() + 1.0))[None]  # [1, H, W]
        return {"ir": flip_width(x, window.flip)}

    def pixel_loss(self, pred, target):
        return (pred - target).abs().mean(dim=1)
'''


def write_bag_with_ir(out: Path) -> list[np.ndarray]:
    """The sample bag plus an `ir` topic derived from its real colour frames; returns the ir images written."""
    from rosbags.highlevel import AnyReader
    from rosbags.rosbag1 import Writer
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS1_NOETIC)
    images = []
    with AnyReader([BAG1]) as reader, Writer(out) as writer:
        conns = {c.id: writer.add_connection(c.topic, c.msgtype, msgdef=c.msgdef.data, md5sum=c.digest)
                 for c in reader.connections}
        ir_conn = writer.add_connection(IR_TOPIC, "sensor_msgs/msg/Image", typestore=store)
        for conn, stamp, raw in reader.messages():
            writer.write(conns[conn.id], stamp, raw)
            if conn.topic == RGB_TOPIC:
                msg = reader.deserialize(raw, conn.msgtype)
                rgb = np.asarray(msg.data).reshape(msg.height, msg.width, 3).astype(np.float32)
                ir = np.round((rgb @ np.float32([0.299, 0.587, 0.114])) * 256).astype(np.uint16)
                images.append(ir)
                ir_msg = store.types["sensor_msgs/msg/Image"](
                    msg.header, msg.height, msg.width, "mono16", 0, msg.width * 2, ir.astype("<u2").view(np.uint8).ravel())
                writer.write(ir_conn, stamp, store.serialize_ros1(ir_msg, ir_conn.msgtype))
    return images


@pytest.fixture(scope="module")
def ir_setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ir")
    plugin = folder / "ir_adapter.py"
    plugin.write_text(IR_ADAPTER)
    bag = folder / "kinect_ir.bag"
    images = write_bag_with_ir(bag)
    return folder, plugin, bag, images


def test_extra_topic_converts_as_its_adapter_stores_it(ir_setup):
    folder, plugin, bag, images = ir_setup
    out = folder / "kinect_ir_full.h5"
    code, text = run_cli("convert", "--rosbag", bag, out, "--rgb-topic", RGB_TOPIC, "--depth-topic", DEPTH_TOPIC,
                         "--topic", f"ir={IR_TOPIC}", "--plugin", plugin, "--no-progress")
    assert code == 0, text
    with DecodedFile(out) as f:
        assert f["all/ir"].dtype == np.uint16 and f["all/ir"].attrs["units"] == "raw sensor counts"
        np.testing.assert_array_equal(f["all/ir"][()], np.stack(images))  # stored exactly as decoded
        assert f["all/rgb"].shape == (2, 480, 640, 3)
    code, text = run_cli("info", out)
    assert code == 0 and "ir" in text and "uint16" in text and "units: raw sensor counts, 0.61 MB/frame" in text
    info = json.loads(run_cli("info", out, "--json")[1])
    assert info["splits"]["all"]["datasets"]["ir"]["bytes_per_frame"] == 480 * 640 * 2


def test_unknown_stream_name_and_missing_plugin_are_one_line(ir_setup, tmp_path):
    folder, plugin, bag, _ = ir_setup
    code, text = run_cli("convert", "--rosbag", bag, tmp_path / "x.h5", "--rgb-topic", RGB_TOPIC,
                         "--depth-topic", DEPTH_TOPIC, "--topic", f"thermal={IR_TOPIC}")
    assert code == 2 and "no registered modality stores 'thermal'" in text and "--plugin" in text
    assert not (tmp_path / "x.h5").exists()
    code, text = run_cli("convert", "--rosbag", bag, tmp_path / "x.h5", "--rgb-topic", RGB_TOPIC,
                         "--depth-topic", DEPTH_TOPIC, "--topic", "ir=/nope", "--plugin", plugin)
    assert code == 2 and "ir topic '/nope' is not in the bag" in text


def test_ir_pretrains_finetunes_and_evaluates_through_the_cli(ir_setup):
    folder, plugin, bag, _ = ir_setup
    data = folder / "kinect_ir.h5"
    code, text = run_cli("convert", "--rosbag", bag, data, "--rgb-topic", RGB_TOPIC, "--depth-topic", DEPTH_TOPIC,
                         "--topic", f"ir={IR_TOPIC}", "--plugin", plugin, "--size", "60x80", "--no-progress")
    assert code == 0, text
    common = ["--set", "data.train_split=all", "--set", "model.inputs=[rgb,ir]"]
    sets = [arg for item in TINY for arg in ("--set", item)]
    code, text = run_cli("pretrain", RECIPES / "tiny.yaml", "--data", data, "--out", folder / "pre", "--plugin", plugin,
                         *common, "--set", "model.outputs=[rgb,ir]", "--set", "model.num_visible=8",
                         "--set", "optim.batch_size=2", "--set", "train.max_steps=3", *sets)
    assert code == 0, text
    metrics = [json.loads(line) for line in (folder / "pre" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "step" in m]
    assert len(steps) == 3 and all(np.isfinite(m["ir"]) and m["ir"] > 0 for m in steps)  # ir is trained

    sets = [arg for item in TINY_DEPTH for arg in ("--set", item)]
    code, text = run_cli("finetune", RECIPES / "tiny_finetune_depth.yaml", "--init", folder / "pre" / "last.pt",
                         "--data", data, "--out", folder / "ft", "--plugin", plugin, *common,
                         "--set", "optim.batch_size=2", "--set", "train.max_steps=3", *sets)
    assert code == 0, text

    code, text = run_cli("eval", "--checkpoint", folder / "ft" / "last.pt", "--data", data, "--split", "all",
                         "--inputs", "rgb", "--inputs", "rgb,ir", "--plugin", plugin)
    assert code == 0, text
    rows = {line.split("│")[1].strip() for line in text.splitlines() if line.startswith("│")}
    assert rows == {"rgb", "rgb,ir"}, text

    code, text = run_cli("weights", folder / "pre", "--plugin", plugin)  # a run folder means its newest checkpoint
    assert code == 0 and "format mmtk" in text and "inputs rgb,ir" in text and "outputs rgb,ir" in text, text

    # A fresh process without --plugin: the checkpoint names the plugin file its modality came from.
    done = subprocess.run([*CLI, "eval", "--checkpoint", str(folder / "ft" / "last.pt"), "--data", str(data),
                           "--split", "all"], capture_output=True, text=True, env=ONE_THREAD_ENV)
    assert done.returncode == 2 and f"modality 'ir' from the plugin {plugin}; pass --plugin {plugin}" in done.stderr


def test_recipe_plugins_are_relative_to_the_recipe_file(tmp_path, monkeypatch):
    import mmtk.modality
    from mmtk.config import load_recipe
    from mmtk.modality import list_modalities

    # 'thermal' registered for this test only: test_predict_sources registers a 'thermal' plugin of its own
    list_modalities()  # mmtk's own adapters registered (once per process) before the copy
    monkeypatch.setattr(mmtk.modality, "_REGISTRY", dict(mmtk.modality._REGISTRY))
    folder = tmp_path / "robot"
    folder.mkdir()
    (folder / "thermal_adapter.py").write_text(IR_ADAPTER.replace('"ir"', '"thermal"').replace("Infrared", "Thermal"))
    (folder / "my.yaml").write_text("kind: pretrain\nplugins: [thermal_adapter.py]\nmodel: {inputs: [rgb, thermal]}\n")
    monkeypatch.chdir(tmp_path)  # not the recipe's folder
    recipe = load_recipe(str(folder / "my.yaml"))
    assert recipe.plugins == (str((folder / "thermal_adapter.py").resolve()),)
    assert "thermal" in list_modalities() and recipe.model.inputs == ("rgb", "thermal")


SENSOR_ADAPTER = '''
"""Two metric sensors that prepare themselves (per-frame standardisation, no mmtk helper); only temperature says
how a standardised prediction goes back to its units (to_units), humidity does not."""
import numpy as np
import torch

from mmtk.data.resize import resize_stored
from mmtk.data.transforms import flip_width
from mmtk.modality import Modality, StoredArray, register_modality


def frame_stats(values):
    measured = values[values > 0]
    return float(measured.mean()), float(measured.std()) + 1.0


class Standardised(Modality):
    def load(self, read, window, image_size):
        values = resize_stored("metric", read(self.name), image_size)
        mean, std = frame_stats(values)
        x = np.where(values > 0, (values - mean) / std, 0).astype(np.float32)
        return {self.name: flip_width(torch.from_numpy(x)[None], window.flip)}

    def pixel_loss(self, pred, target):
        return (pred - target).abs().mean(dim=1)


@register_modality
class Temperature(Standardised):
    name = "temperature"
    stores = (StoredArray("temperature", "metric", ("float32",), "K"),)

    def to_units(self, standardised, measured, valid):
        stats = [frame_stats(np.where(v, m, 0)) for m, v in zip(measured.numpy(), valid.numpy())]
        mean, std = torch.tensor(stats, dtype=standardised.dtype).T.reshape(2, -1, 1, 1, 1)
        return standardised * std + mean


@register_modality
class Humidity(Standardised):
    name = "humidity"
    stores = (StoredArray("humidity", "metric", ("float32",), "%"),)
'''


def test_a_plugin_modality_prepares_itself_and_puts_predictions_back_in_its_units(tmp_path, monkeypatch):
    """Preparation and its inverse live in the plugin file: predict writes temperature in kelvin, scaled by the
    frame's own measurement through the adapter's to_units; humidity, whose adapter has none, stays relative."""
    import torch

    import mmtk
    import mmtk.modality
    from data_helpers import kinect_frame
    from mmtk.data.sources.frame import Frame
    from mmtk.modality import list_modalities
    from mmtk.plugins import load_plugin
    from mmtk.predict import load_predictor, predict_frame

    list_modalities()  # mmtk's own adapters registered before the copies: the plugin's stay in this test
    monkeypatch.setattr(mmtk.modality, "_REGISTRY", dict(mmtk.modality._REGISTRY))
    monkeypatch.setattr(mmtk.modality, "_ORIGINS", dict(mmtk.modality._ORIGINS))
    (tmp_path / "sensors.py").write_text(SENSOR_ADAPTER)
    assert load_plugin(tmp_path / "sensors.py") == ["humidity", "temperature"]
    # Stand-ins DERIVED from the real Kinect frame: 293-308 K and 30-70 % from its luminance where depth is measured.
    rgb, depth_m = kinect_frame()
    luminance = (rgb @ np.float32([0.299, 0.587, 0.114])) / 255
    kelvin = np.where(depth_m > 0, 293.0 + 15.0 * luminance, 0).astype(np.float32)
    humidity = np.where(depth_m > 0, 30.0 + 40.0 * luminance, 0).astype(np.float32)
    args = dict(dim=64, depth=2, num_heads=2, image_size=(64, 96), decoder_dim=32, decoder_depth=1, decoder_heads=2,
                inputs=("rgb", "temperature", "humidity"), outputs=("temperature", "humidity"))
    torch.manual_seed(0)
    model = mmtk.create_model("multimae-tiny", verbose=False, **args)
    torch.save({"model_name": "multimae-tiny", "model_args": args, "model": model.state_dict()}, tmp_path / "m.pt")
    predictor = load_predictor(tmp_path / "m.pt")
    outputs = ("temperature", "humidity")
    alone = predict_frame(predictor, Frame("all", {"rgb": rgb}), outputs).outputs
    measured = predict_frame(predictor, Frame("all", {"rgb": rgb, "temperature": kelvin, "humidity": humidity}),
                             outputs).outputs  # both requested, so both are hidden: they only give the frame's scale
    assert alone["temperature"].units == "relative" and measured["temperature"].units == "K"
    valid = kelvin[kelvin > 0]
    expected = np.clip(alone["temperature"].values * (valid.std() + 1.0) + valid.mean(), 0, None)
    np.testing.assert_allclose(measured["temperature"].values, expected, rtol=0, atol=1e-3)
    assert 250 < measured["temperature"].values.mean() < 350  # kelvin, not standardised values
    assert measured["humidity"].units == "relative"
    np.testing.assert_allclose(measured["humidity"].values, alone["humidity"].values, rtol=0, atol=1e-5)
