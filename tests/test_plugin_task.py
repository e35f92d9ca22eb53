"""A task family mmtk does not know, from a bag to an evaluation table and an ONNX file, with a plugin file and the CLI.

The plugin below (written from this test file; no file under mmtk/, adapters/ or cli/ names it) registers a
thermal camera, `thermal` (per-pixel temperature in kelvin, float32, 0 = no reading), and the task family that
finetunes and scores it: per-pixel regression, L1 loss in kelvin, scored by the mean absolute error in kelvin. Its
frames are DERIVED from the real Kinect frames shipped in samples/ (the sample bag has no thermal camera):
280 K + 30 K x the colour image's luminance, no reading (0) where the depth camera has none, stamped like the
colour image.

A second test adds a metric to mmtk's own depth family from this file: one column and one sum, nothing else.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_helpers import BAG1, DEPTH_TOPIC, RGB_TOPIC
from engine_helpers import CLI, ONE_THREAD_ENV, RECIPES, TINY_DEPTH, run_cli, sample_h5  # noqa: F401
from mmtk.errors import MmtkError

THERMAL_TOPIC = "/camera/thermal/image_raw"
THERMAL_PLUGIN = '''
"""A thermal camera (kelvin per pixel) and its task family: per-pixel regression scored by MAE in kelvin."""
import numpy as np
import torch
from torchmetrics import Metric

from mmtk.data.resize import resize_stored
from mmtk.data.transforms import flip_width
from mmtk.modality import Modality, StoredArray, register_modality
from mmtk.task import Column, EvalPicture, TaskFamily, register_task_family
from mmtk.visualize import colorize_depth, depth_bar


@register_modality
class Thermal(Modality):
    name = "thermal"
    channels = 1
    task_family = "kelvin"
    stores = (StoredArray("thermal", "metric", ("float32",), "K"),)

    def load(self, read, window, image_size):
        kelvin = flip_width(torch.from_numpy(resize_stored("metric", read("thermal"), image_size))[None], window.flip)
        valid = kelvin > 0
        return {"thermal": torch.where(valid, (kelvin - 295.0) / 10.0, 0.0), "thermal_valid": valid,
                "thermal_K": kelvin}

    def pixel_loss(self, pred, target):
        return (pred - target).abs().mean(dim=1)


class KelvinMAE(Metric):
    """Mean absolute error in kelvin over the valid pixels of all frames."""

    def __init__(self):
        super().__init__()
        self.add_state("error", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("pixels", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred, target, valid):
        keep = valid.bool()
        self.error += (pred.double() - target.double()).abs()[keep].sum()
        self.pixels += keep.sum()

    def compute(self):
        return {"mae": self.error / self.pixels, "pixels": self.pixels}


def l1_kelvin(pred, target, valid):
    """L1 in kelvin over valid pixels, mean per batch."""
    return ((pred.float() - target).abs() * valid).sum() / valid.sum().clamp(min=1)


@register_task_family
class KelvinRegression(TaskFamily):
    name = "kelvin"
    title = "temperature (kelvin, valid pixels)"
    losses = {"l1_kelvin": l1_kelvin}
    columns = (Column("mae", "MAE K", digits=2),)
    units = "K"

    def targets(self, task):
        return (f"{task}_K", f"{task}_valid")

    def loss(self, pred, batch, task, settings):
        return self.losses[settings.loss](pred, batch[f"{task}_K"], batch[f"{task}_valid"])

    def metric(self, adapter, num_classes, protocol, view, frame_size):
        return KelvinMAE()

    def update(self, metric, pred, batch, task):
        metric.update(pred, batch[f"{task}_K"], batch[f"{task}_valid"])

    def output_name(self, task):
        return f"{task}_K"

    def picture(self, batch, index, task, style, pred=None):
        target = batch[f"{task}_K"][index, 0].cpu().numpy()
        lo, hi = float(target[target > 0].min()), float(target.max())
        return EvalPicture(colorize_depth(target, value_range=(lo, hi)),
                           None if pred is None else colorize_depth(pred[0].numpy(), value_range=(lo, hi)),
                           lambda width: depth_bar(width, lo, hi, "K", "temperature, kelvin"))
'''


def write_bag_with_thermal(out: Path) -> None:
    """The sample bag plus a `thermal` topic (32FC1, kelvin) derived from its real colour and depth frames."""
    from rosbags.highlevel import AnyReader
    from rosbags.rosbag1 import Writer
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS1_NOETIC)
    with AnyReader([BAG1]) as reader, Writer(out) as writer:
        conns = {c.id: writer.add_connection(c.topic, c.msgtype, msgdef=c.msgdef.data, md5sum=c.digest)
                 for c in reader.connections}
        thermal_conn = writer.add_connection(THERMAL_TOPIC, "sensor_msgs/msg/Image", typestore=store)
        messages = list(reader.messages())
        depth = [reader.deserialize(raw, conn.msgtype) for conn, _, raw in messages if conn.topic == DEPTH_TOPIC]
        for conn, stamp, raw in messages:
            writer.write(conns[conn.id], stamp, raw)
            if conn.topic == RGB_TOPIC:
                msg = reader.deserialize(raw, conn.msgtype)
                rgb = np.asarray(msg.data).reshape(msg.height, msg.width, 3).astype(np.float32)
                nearest = min(depth, key=lambda d: abs(d.header.stamp.sec + d.header.stamp.nanosec * 1e-9
                                                       - msg.header.stamp.sec - msg.header.stamp.nanosec * 1e-9))
                measured = np.asarray(nearest.data).view("<u2").reshape(msg.height, msg.width) > 0
                kelvin = np.where(measured, 280.0 + 30.0 * (rgb @ np.float32([0.299, 0.587, 0.114])) / 255.0, 0.0)
                image = store.types["sensor_msgs/msg/Image"](
                    msg.header, msg.height, msg.width, "32FC1", 0, msg.width * 4,
                    kelvin.astype("<f4").view(np.uint8).ravel())
                writer.write(thermal_conn, stamp, store.serialize_ros1(image, thermal_conn.msgtype))


@pytest.fixture(scope="module")
def thermal_run(tmp_path_factory):
    """The plugin file, the converted bag (60 x 80) and a tiny model finetuned on rgb -> thermal (the plugin's
    registrations end with this file: tests/conftest.py)."""
    yield _convert_and_finetune(tmp_path_factory.mktemp("thermal"))


def _convert_and_finetune(folder: Path) -> tuple[Path, Path, Path]:
    plugin = folder / "thermal_plugin.py"
    plugin.write_text(THERMAL_PLUGIN)
    bag = folder / "kinect_thermal.bag"
    write_bag_with_thermal(bag)
    data = folder / "kinect_thermal.h5"
    code, text = run_cli("convert", "--rosbag", bag, data, "--rgb-topic", RGB_TOPIC, "--depth-topic", DEPTH_TOPIC,
                         "--topic", f"thermal={THERMAL_TOPIC}", "--plugin", plugin, "--size", "60x80", "--no-progress")
    assert code == 0, text
    sets = [arg for item in TINY_DEPTH + ["data.train_split=all", "model.task=thermal", "model.inputs=[rgb]",
                                          "train.loss=l1_kelvin", "optim.batch_size=2", "train.max_steps=3"]
            for arg in ("--set", item)]
    code, text = run_cli("finetune", RECIPES / "tiny_finetune_depth.yaml", "--data", data, "--out", folder / "ft",
                         "--plugin", plugin, *sets)
    assert code == 0, text
    return folder, plugin, data


def test_plugin_task_family_finetunes_evaluates_and_exports(thermal_run):
    folder, plugin, data = thermal_run
    metrics = [json.loads(line) for line in (folder / "ft" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["thermal"] for m in metrics if "step" in m]
    assert len(losses) == 3 and all(np.isfinite(losses)) and losses[0] > 1.0  # L1 in kelvin: far from 295 K at first

    code, text = run_cli("eval", "--checkpoint", folder / "ft", "--data", data, "--split", "all", "--inputs", "rgb",
                         "--json", folder / "eval.json", "--save-predictions", folder / "pictures", "--plugin", plugin)
    assert code == 0, text
    assert "temperature (kelvin, valid pixels)" in " ".join(text.split()) and "MAE K" in text  # the family's title, column
    row = json.loads((folder / "eval.json").read_text())["results"][0]
    assert row["task"] == "thermal" and set(row["metrics"]) == {"mae", "pixels"}
    assert f"{row['metrics']['mae']:.2f}" in text

    # The same number computed here: the model on the rgb crops, upsampled to the stored 60 x 80 kelvin frames.
    import mmtk
    from mmtk.data import H5Dataset

    model = mmtk.create_model(pretrained=folder / "ft" / "last.pt", verbose=False).eval()
    inputs, targets = H5Dataset(data, "all", ("rgb",), (64, 64)), H5Dataset(data, "all", ("thermal",), None)
    errors = []
    with torch.no_grad():
        for index in range(len(inputs)):
            target = targets[index]
            pred = F.interpolate(model({"rgb": inputs[index]["rgb"][None]}), size=(60, 80), mode="bilinear",
                                 align_corners=False)[0]
            errors.append((pred - target["thermal_K"]).abs()[target["thermal_valid"]].double())
    assert row["metrics"]["pixels"] == sum(len(e) for e in errors) and row["metrics"]["pixels"] < 2 * 60 * 80
    assert row["metrics"]["mae"] == pytest.approx(float(torch.cat(errors).mean()), rel=1e-5)
    assert sorted(p.name for p in (folder / "pictures").iterdir()) == ["frame00000_rgb_thermal.png",
                                                                       "frame00001_rgb_thermal.png"]

    out = folder / "thermal.onnx"
    code, text = run_cli("export", folder / "ft", "--onnx", out, "--plugin", plugin)
    assert code == 0, text
    assert "output thermal_K" in text  # named by the family
    import onnx

    assert [output.name for output in onnx.load(str(out)).graph.output] == ["thermal_K"]

    # predict without --outputs: a finetuned model predicts its task, written in its adapter's units (kelvin)
    code, text = run_cli("predict", "--checkpoint", folder / "ft", "--data", data, "--split", "all", "--index", "0",
                         "--out", folder / "pred", "--plugin", plugin)
    assert code == 0, text
    written = sorted(p.name for p in (folder / "pred").iterdir())
    assert len(written) == 2 and written[0].endswith("_thermal.npy") and written[1].endswith("_thermal.png")
    with torch.no_grad():  # the model's kelvin at the frame's size, as computed above (negative kelvin clipped)
        pred = F.interpolate(model({"rgb": inputs[0]["rgb"][None]}), size=(60, 80), mode="bilinear",
                             align_corners=False)[0, 0].clamp(min=0).numpy()
    np.testing.assert_allclose(np.load(folder / "pred" / written[0]), pred, atol=1e-4)

    # A fresh process without --plugin: the checkpoint names the file its task (modality and family) came from.
    done = subprocess.run([*CLI, "export", str(folder / "ft"), "--onnx", str(folder / "again.onnx")],
                          capture_output=True, text=True, env=ONE_THREAD_ENV)
    assert done.returncode == 2 and f"modality 'thermal' from the plugin {plugin}; pass --plugin {plugin}" in done.stderr


def test_plugin_family_mistakes_are_one_line(thermal_run, tmp_path, monkeypatch):
    folder, plugin, data = thermal_run
    code, text = run_cli("finetune", RECIPES / "tiny_finetune_depth.yaml", "--data", data, "--out", tmp_path / "x",
                         "--plugin", plugin, "--set", "model.task=thermal")  # the recipe's berhu is depth's
    assert code == 2 and "train.loss: thermal finetuning uses 'l1_kelvin', got 'berhu'" in text
    import mmtk.task
    from mmtk.modality import get_modality, require_registered
    from mmtk.plugins import load_plugin

    monkeypatch.setattr(mmtk.task, "_FAMILIES", dict(mmtk.task._FAMILIES))
    del mmtk.task._FAMILIES["kelvin"]  # as in a process that loaded the modality but not the family's file
    with pytest.raises(MmtkError, match=r"unknown task family 'kelvin' \(the task family of modality 'thermal'\); "
                                        r"registered: depth, segmentation .*--plugin FILE.py"):
        get_modality("thermal").family()
    with pytest.raises(MmtkError, match=r"^checkpoint ft.pt: unknown task family 'kelvin' .*--plugin FILE.py\)$"):
        require_registered({"thermal": f"file:{plugin}"}, "checkpoint ft.pt")  # as a checkpoint is read
    families_only = tmp_path / "kelvin_family.py"
    families_only.write_text(THERMAL_PLUGIN.split("@register_modality")[0] + "class KelvinMAE" +
                             THERMAL_PLUGIN.split("class KelvinMAE")[1])
    assert load_plugin(families_only) == ["kelvin"] and get_modality("thermal").family().units == "K"
    empty = tmp_path / "nothing.py"
    empty.write_text("x = 1\n")
    with pytest.raises(MmtkError, match="registers nothing"):
        load_plugin(empty)


def test_a_metric_added_to_a_family_is_one_column_and_one_sum(sample_h5, tmp_path, monkeypatch):  # noqa: F811
    """mmtk's depth family with the mean absolute error added from this file: the table and the JSON show it."""
    import mmtk
    import mmtk.task
    from mmtk.adapters.tasks.depth import DepthMetrics, DepthRegression
    from mmtk.evaluation.protocols import eigen_crop
    from mmtk.task import Column, register_task_family

    class DepthMetricsWithMAE(DepthMetrics):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.add_state("abs_error", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

        def accumulate(self, p: torch.Tensor, t: torch.Tensor) -> None:
            super().accumulate(p, t)
            self.abs_error += (p - t).abs().sum()

        def compute(self) -> dict[str, torch.Tensor]:
            return super().compute() | {"mae": self.abs_error / self.pixels}

    class DepthWithMAE(DepthRegression):
        columns = DepthRegression.columns + (Column("mae", "MAE m"),)

        def metric(self, adapter, num_classes, protocol, view, frame_size):
            return DepthMetricsWithMAE(*protocol.depth_range, region=protocol.depth_region(frame_size, view.target_size))

    monkeypatch.setattr(mmtk.task, "_FAMILIES", dict(mmtk.task._FAMILIES))  # the built-in depth family is back after
    register_task_family(DepthWithMAE)
    torch.manual_seed(0)
    args = dict(dim=64, depth=2, num_heads=2, image_size=(64, 64), inputs=("rgb",), head="dpt", task="depth",
                hooks=(0, 1, 1, 1), layer_dims=(8, 16, 32, 64), dpt_dim=32)
    model = mmtk.create_model("multimae-tiny", verbose=False, **args).eval()
    with torch.no_grad():
        model.head.output[-1].bias.fill_(2.0)  # near the frame's metres, so the clamp to 1 mm - 10 m rarely bites
    torch.save({"model_name": "multimae-tiny", "model_args": args, "model": model.state_dict()}, tmp_path / "d.pt")

    code, text = run_cli("eval", "--checkpoint", tmp_path / "d.pt", "--data", sample_h5, "--inputs", "rgb",
                         "--json", tmp_path / "eval.json")
    assert code == 0, text
    assert "MAE m" in text and "RMSE m" in text
    got = json.loads((tmp_path / "eval.json").read_text())["results"][0]["metrics"]
    assert set(got) == {"delta1", "delta2", "delta3", "abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "mae", "pixels"}

    from mmtk.data import H5Dataset

    frame, truth = H5Dataset(sample_h5, "test", ("rgb",), (64, 64))[0], H5Dataset(sample_h5, "test", ("depth",), None)[0]
    with torch.no_grad():
        pred = F.interpolate(model({"rgb": frame["rgb"][None]}), size=(120, 160), mode="bilinear", align_corners=False)
    target = truth["depth_m"][None].double()
    keep = truth["depth_valid"][None].bool() & eigen_crop((120, 160)) & (target > 1e-3) & (target <= 10)
    expected = (pred.double().clamp(1e-3, 10) - target).abs()[keep].mean()
    assert got["mae"] == pytest.approx(float(expected), rel=1e-6) and got["mae"] <= got["rmse"]
    assert f"{got['mae']:.3f}" in text


def test_training_evaluation_export_and_the_cli_compare_no_family_or_modality_name():
    """No `==`/`in` against a registered task family's or modality's name in the code that trains, evaluates,
    exports, predicts or prints (sources may know their sensor roles: mmtk/data is not checked)."""
    import ast

    from mmtk.modality import list_modalities
    from mmtk.task import list_task_families

    repo = Path(__file__).resolve().parents[1]
    names = set(list_modalities()) | set(list_task_families())
    files = [*(repo / "mmtk" / "train").glob("*.py"), *(repo / "mmtk" / "evaluation").glob("*.py"),
             *(repo / "mmtk" / "weights").glob("*.py"), *(repo / "cli").glob("*.py")]
    files += [repo / "mmtk" / name for name in ("export.py", "predict.py", "config.py", "task.py", "modality.py",
                                                "registry.py", "bag_writer.py", "pointcloud.py", "plugins.py")]
    compared = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                constants = [c for side in sides for c in (getattr(side, "elts", None) or [side])]
                compared += [f"{path.name}:{node.lineno} {c.value!r}" for c in constants
                             if isinstance(c, ast.Constant) and c.value in names]
    assert len(files) > 20 and not compared
