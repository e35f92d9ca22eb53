"""`mmtk eval --protocol`: both protocols against an independent implementation written here, on fixed predictions.

The model is replaced by a fixed prediction (a depth ramp, the same for every frame, on the model's input grid),
so the numbers depend only on the protocol: which pixels of the real NYUv2 frame are compared with which, and how
the metrics are pooled. The reference below is written from the protocols' definitions, not from mmtk's code:
  standard: bilinear upsampling of the prediction to the full frame, Eigen crop (rows 45-470, columns 41-600 of
            480 x 640), ground truth in (1 mm, 10 m], prediction clamped to that range, pooled over all pixels;
  multimae: resize the short side to the model's input, centre crop it (EPFL-VILAB/MultiMAE nyu_transform), the
            official masked_nyu_metrics (no cap, "log10" = RMSE of natural logs) per batch of 96 frames, averaged.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mmtk.evaluation.evaluate as evaluate_module
from data_helpers import DecodedFile
from engine_helpers import SAMPLES
from mmtk.errors import MmtkError
from mmtk.adapters.tasks.depth import BatchMeanDepthMetrics
from mmtk.model.multimae import ModelConfig

MODEL_SIZE = (256, 256)


@pytest.fixture(scope="module")
def full_h5(tmp_path_factory):
    """The real NYUv2 labelled sample frame at its own 480 x 640 (1 frame per split)."""
    from mmtk.data import convert_rgbd

    out = tmp_path_factory.mktemp("data") / "nyuv2_full.h5"
    convert_rgbd(SAMPLES / "nyuv2_multimae", out, progress=False)
    return out


def ramp(size: tuple[int, int]) -> torch.Tensor:
    """The fixed prediction: 1.5 m at the top left rising to 4.5 m at the bottom right, [1, 1, H, W]."""
    rows = torch.linspace(0, 1, size[0])[:, None]
    cols = torch.linspace(0, 1, size[1])[None, :]
    return (1.5 + 2.0 * rows + 1.0 * cols)[None, None]


@pytest.fixture
def fixed_model(monkeypatch):
    """evaluate() with a depth 'model' that predicts :func:`ramp` on its input grid; records the inputs it saw."""
    config = ModelConfig(inputs=("rgb",), head="dpt", task="depth", image_size=MODEL_SIZE)
    seen = []

    def predict(model, kind, batch, combo, tasks, full_size):
        seen.append({name: batch[name].clone() for name in combo})
        return {tasks[0]: ramp(full_size).expand(batch["rgb"].shape[0], 1, *full_size)}

    monkeypatch.setattr(evaluate_module, "load_trained_model", lambda *a, **k: SimpleNamespace(config=config))
    monkeypatch.setattr(evaluate_module, "_predict", predict)
    return seen


def stored_depth(path) -> np.ndarray:
    with DecodedFile(path) as handle:
        return handle["test/depth"][0].astype(np.float64)  # [480, 640] metres, 0 = invalid


def pooled(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    ratio = np.maximum(pred / gt, gt / pred)
    return {"delta1": np.mean(ratio < 1.25), "abs_rel": np.mean(np.abs(pred - gt) / gt),
            "sq_rel": np.mean((pred - gt) ** 2 / gt), "rmse": math.sqrt(np.mean((pred - gt) ** 2)),
            "rmse_log": math.sqrt(np.mean((np.log(pred) - np.log(gt)) ** 2)),
            "log10": np.mean(np.abs(np.log10(pred) - np.log10(gt)))}


def standard_reference(depth: np.ndarray) -> dict[str, float]:
    pred = F.interpolate(ramp(MODEL_SIZE), size=depth.shape, mode="bilinear", align_corners=False)[0, 0].double()
    keep = np.zeros(depth.shape, dtype=bool)
    keep[45:471, 41:601] = True  # Eigen crop of a 480 x 640 frame
    keep &= (depth > 1e-3) & (depth <= 10.0)
    return pooled(np.clip(pred.numpy()[keep], 1e-3, 10.0), depth[keep])


def multimae_reference(depth: np.ndarray) -> dict[str, float]:
    height, width = depth.shape
    short = MODEL_SIZE[0]
    resized_w = round(width * short / height)  # short side to the input size
    gt = F.interpolate(torch.from_numpy(depth)[None, None], size=(short, resized_w), mode="bilinear",
                       antialias=True, align_corners=False)[0, 0].numpy()
    left = (resized_w - MODEL_SIZE[1]) // 2
    gt = gt[:, left:left + MODEL_SIZE[1]]  # centre crop
    keep = gt > 0
    metrics = pooled(ramp(MODEL_SIZE)[0, 0].double().numpy()[keep], gt[keep])
    metrics["log10"] = float("nan")  # the official code has no log10
    return metrics


def test_standard_protocol_is_the_eigen_crop_capped_and_pooled(full_h5, fixed_model):
    rows, frames = evaluate_module.evaluate("fixed", full_h5, ["rgb"], protocol="standard")
    got, want = rows[0].metrics, standard_reference(stored_depth(full_h5))
    assert frames == 1 and rows[0].task == "depth"
    assert got["pixels"] == int(((stored_depth(full_h5)[45:471, 41:601] > 1e-3)
                                 & (stored_depth(full_h5)[45:471, 41:601] <= 10)).sum())
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6), key
    assert fixed_model[0]["rgb"].shape[-2:] == MODEL_SIZE  # the model saw the whole frame at its input size


def test_multimae_protocol_is_the_official_centre_crop_and_metrics(full_h5, fixed_model):
    rows, _ = evaluate_module.evaluate("fixed", full_h5, ["rgb"], protocol="multimae")
    got, want = rows[0].metrics, multimae_reference(stored_depth(full_h5))
    # mmtk reads the centred 480 x 480 square and resizes it; the reference resizes the frame to 256 x 341 and
    # crops 256: the same pixels up to the rounding of 341.33 (under a source pixel)
    for key in ("delta1", "abs_rel", "sq_rel", "rmse", "rmse_log"):
        assert got[key] == pytest.approx(want[key], rel=5e-3), key
    assert math.isnan(got["log10"])
    standard = standard_reference(stored_depth(full_h5))
    # the protocols measure different things: far beyond the tolerance above
    assert abs(got["sq_rel"] - standard["sq_rel"]) > 0.05 * standard["sq_rel"]
    assert abs(got["delta1"] - standard["delta1"]) > 0.01


def test_official_metrics_average_over_batches_of_96_frames():
    """3 frames in batches of 2 (the official logger's mean of per-batch values), not pooled over all pixels; the
    multimae protocol's batches are the official 96 frames (1.5 x its training batch of 64)."""
    from mmtk.evaluation.protocols import get_protocol

    assert get_protocol("multimae").depth_batch_frames == 96
    target = torch.tensor([[1.0, 2.0], [3.0, 0.0], [4.0, 4.0]]).view(3, 1, 1, 2)  # frame 2 has an invalid pixel
    pred = torch.tensor([[1.5, 2.0], [2.0, 9.0], [4.0, 5.0]]).view(3, 1, 1, 2)
    metric = BatchMeanDepthMetrics(batch_frames=2)
    metric.update(pred[:1], target[:1])
    metric.update(pred[1:], target[1:])  # the loader's batches need not be the protocol's
    first = np.array([0.5, 0.0, 1.0])  # |error| of the valid pixels of frames 0 and 1
    second = np.array([0.0, 1.0])
    rmse = (math.sqrt(np.mean(first**2)) + math.sqrt(np.mean(second**2))) / 2
    abs_rel = (np.mean(first / np.array([1, 2, 3])) + np.mean(second / np.array([4, 4]))) / 2
    result = metric.compute()
    assert float(result["rmse"]) == pytest.approx(rmse)
    assert float(result["abs_rel"]) == pytest.approx(abs_rel)
    assert int(result["pixels"]) == 5


def test_multimae_semseg_pads_the_input_and_scores_the_frame(full_h5, monkeypatch):
    """Semseg: the frame fits the model's 640 x 640 input, padded at the bottom (rgb pad 0 = the normalised
    mean); predictions on the pad are not scored."""
    config = ModelConfig(inputs=("rgb",), head="convnext", task="semseg", image_size=(640, 640), num_classes=40)
    seen = []

    def predict(model, kind, batch, combo, tasks, full_size):
        seen.append(batch["rgb"])
        logits = torch.zeros(batch["rgb"].shape[0], 40, *full_size)
        logits[:, 3] = 1.0  # "class 3 everywhere" on the frame ...
        logits[:, 7, 480:] = 2.0  # ... and class 7 on the pad, which must not count
        return {tasks[0]: logits}

    monkeypatch.setattr(evaluate_module, "load_trained_model", lambda *a, **k: SimpleNamespace(config=config))
    monkeypatch.setattr(evaluate_module, "_predict", predict)
    rows, _ = evaluate_module.evaluate("fixed", full_h5, ["rgb"], protocol="multimae")
    assert seen[0].shape[-2:] == (640, 640) and not seen[0][..., 480:, :].any()
    with DecodedFile(full_h5) as handle:
        labels = handle["test/semseg"][0].astype(np.int64) - 1  # stored 0 = unlabelled
    labelled = labels >= 0
    present = np.unique(labels[labelled])
    iou = [np.sum((labels == c) & labelled & (c == 3)) / np.sum(((labels == c) & labelled) | (c == 3) & labelled)
           for c in present] + ([] if 3 in present else [0.0])
    assert rows[0].metrics["miou"] == pytest.approx(np.mean(iou))
    assert rows[0].metrics["pixels"] == int(labelled.sum())


def test_unknown_protocol_and_json_record(full_h5, fixed_model, tmp_path):
    with pytest.raises(MmtkError, match="unknown evaluation protocol; choose one of standard, multimae"):
        evaluate_module.evaluate("fixed", full_h5, ["rgb"], protocol="eigen")
    rows, frames = evaluate_module.evaluate("fixed", full_h5, ["rgb"], protocol="multimae")
    record = json.loads(evaluate_module.results_json("fixed", full_h5, "test", frames, rows, "multimae"))
    assert record["protocol"]["name"] == "multimae" and "MultiMAE" in record["protocol"]["source"]
    assert record["results"][0]["metrics"]["log10"] is None  # not a metric of the official evaluation
