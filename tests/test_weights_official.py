"""Official MultiMAE finetuned checkpoints (ConvNeXt RGB-D semseg, DPT depth) evaluate and predict directly, and
agree with the official architecture (mmtk's model built the usual way, proven equal by tests/test_parity.py) on
the same frames; every --json output parses with a strict parser."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import mmtk
from engine_helpers import run_cli, sample_h5  # noqa: F401
from weights_helpers import SIZE, reference_metrics, strict_loads

HEADS = dict(dim=128, num_heads=2)  # 64 values per head, as in the released models, so heads need not be given
MODELS = {
    "semseg": dict(head="convnext", task="semseg", inputs=("rgb", "depth"), main_inputs=("rgb",), num_classes=40,
                   depth=2, convnext_dim=256, convnext_depth=1),
    "depth": dict(head="dpt", task="depth", inputs=("rgb",), depth=4, hooks=(0, 1, 2, 3), layer_dims=(16, 32, 64, 64),
                  dpt_dim=32),
}


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """Each finetuned model in the official layout ({'model': state_dict}, official names) and the same model built
    the usual way: explicit arguments, then load_weights (what tests/test_parity.py checks against the official code)."""
    root = tmp_path_factory.mktemp("official")
    files = {}
    for kind, args in MODELS.items():
        torch.manual_seed(0)
        source = mmtk.create_model("multimae-tiny", **HEADS, **args, image_size=SIZE)
        if kind == "depth":
            with torch.no_grad():
                source.head.output[-1].bias.fill_(2.0)  # metres, like a trained model
        path = root / f"multimae-b_nyuv2_{kind}.pth"
        torch.save({"model": mmtk.export_official(source)}, path)
        usual = mmtk.create_model("multimae-tiny", **HEADS, **args, image_size=SIZE)
        report = mmtk.load_weights(usual, torch.load(path, weights_only=True))
        assert report.format == "official" and report.missing == [] and report.unused == []
        files[kind] = path, usual.eval()
    return files


@pytest.mark.parametrize("kind, inputs", [("semseg", "rgb,depth"), ("depth", "rgb")])
def test_eval_on_an_official_checkpoint(kind, inputs, official, sample_h5, tmp_path):
    path, usual = official[kind]
    code, output = run_cli("eval", "--checkpoint", path, "--data", sample_h5, "--inputs", inputs,
                           "--json", tmp_path / "eval.json")
    assert code == 0, output
    payload = strict_loads((tmp_path / "eval.json").read_text())
    (row,) = payload["results"]
    assert row["task"] == kind and row["inputs"] == inputs.split(",")
    expected = reference_metrics(usual, sample_h5, tuple(inputs.split(",")), kind)
    for key in ("miou", "pixel_acc") if kind == "semseg" else ("rmse", "abs_rel", "delta1"):
        assert row["metrics"][key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), key
    if kind == "semseg":  # classes absent from the frame: null, not NaN
        assert None in row["per_class"]["iou"] and len(row["per_class"]["iou"]) == 40


def test_predict_on_an_official_depth_checkpoint(official, sample_h5, tmp_path):
    from mmtk.data.sources.mmtk_files import open_split, read_frame
    from mmtk.predict import Predictor, predict_frame

    path, usual = official["depth"]
    out = tmp_path / "pred"
    code, output = run_cli("predict", "--checkpoint", path, "--data", sample_h5, "--split", "test", "--outputs", "depth",
                           "--out", out)
    assert code == 0, output
    (written,) = sorted(out.glob("*_depth.npy"))
    with open_split(sample_h5, "test") as group:
        frame = read_frame(group, 0, ["rgb", "depth"])
    reference = predict_frame(Predictor(usual, "usual", {}, "cpu"), frame, outputs=("depth",)).outputs["depth"]
    np.testing.assert_allclose(np.load(written), reference.values, rtol=1e-6, atol=1e-6)
    assert reference.values.shape == frame.arrays["rgb"].shape[:2] and reference.units == "m"


def test_eval_refuses_data_labelled_in_other_classes(official, sample_h5, tmp_path):
    path, _ = official["semseg"]
    state = torch.load(path, weights_only=True)["model"]
    state["output_adapters.semseg.final_layer.weight"] = state["output_adapters.semseg.final_layer.weight"][:13]
    state["output_adapters.semseg.final_layer.bias"] = state["output_adapters.semseg.final_layer.bias"][:13]
    torch.save({"model": state}, tmp_path / "nyu13.pth")
    code, output = run_cli("eval", "--checkpoint", tmp_path / "nyu13.pth", "--data", sample_h5, "--inputs", "rgb")
    assert code == 2 and "knows 13 semantic classes but" in output and "labelled with 40" in output


def test_data_info_json_is_strict(sample_h5):
    code, output = run_cli("info", sample_h5, "--json")
    assert code == 0 and strict_loads(output)["splits"]


def test_official_pretraining_checkpoint_evaluates_depth_when_the_classes_differ(sample_h5, tmp_path):
    """The official pretrained model knows 133 COCO classes; on NYUv2's 40 its depth is evaluated, semseg is not."""
    torch.manual_seed(0)
    source = mmtk.create_model("multimae-tiny", **HEADS, depth=2, decoder_dim=64, decoder_depth=1, num_classes=133,
                               image_size=SIZE)
    torch.save({"model": mmtk.export_official(source)}, tmp_path / "multivit.pth")
    code, output = run_cli("eval", "--checkpoint", tmp_path / "multivit.pth", "--data", sample_h5, "--inputs", "rgb",
                           "--json", tmp_path / "eval.json")
    assert code == 0, output
    rows = {row["task"]: row for row in strict_loads((tmp_path / "eval.json").read_text())["results"]}
    assert rows["semseg"]["metrics"] == {} and "knows 133 semantic classes" in rows["semseg"]["note"]
    assert rows["depth"]["metrics"]["pixels"] > 0 and rows["depth"]["metrics"]["rmse"] > 0
