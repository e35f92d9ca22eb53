"""Metrics against values computed by hand on small arrays (ignored labels, invalid depth pixels, pooling)."""

import math

import pytest
import torch

from mmtk.adapters.tasks.depth import DepthMetrics
from mmtk.adapters.tasks.segmentation import SegmentationMetrics


def test_segmentation_pooled_over_batches_with_ignored_labels():
    metric = SegmentationMetrics(num_classes=3, ignore_index=255)
    # Frame 1: 2x3, one ignored pixel.
    target1 = torch.tensor([[[0, 0, 1], [1, 255, 2]]])
    pred1 = torch.tensor([[[0, 1, 1], [1, 0, 2]]])  # the ignored pixel's prediction must not count
    # Frame 2: 1x3
    target2 = torch.tensor([[[2, 2, 0]]])
    pred2 = torch.tensor([[[2, 0, 0]]])
    metric.update(pred1, target1)
    metric.update(pred2, target2)
    out = metric.compute()
    # Pooled confusion (rows truth, cols pred) over 8 counted pixels:
    # class 0: truth at 3 pixels, predicted 0 at 2 of them; predicted 0 also once for a truth-2 pixel
    # class 1: truth 2, both right; predicted 1 once more for a truth-0 pixel
    # class 2: truth 3, right at 2
    inter = torch.tensor([2.0, 2.0, 2.0])
    union = torch.tensor([3 + 3 - 2, 2 + 3 - 2, 3 + 2 - 2], dtype=torch.float64)
    assert out["intersection"].tolist() == inter.tolist()
    assert out["union"].tolist() == union.tolist()
    assert out["pixels"].item() == 8
    assert out["pixel_acc"].item() == pytest.approx(6 / 8)
    assert out["miou"].item() == pytest.approx((2 / 4 + 2 / 3 + 2 / 3) / 3)
    assert out["mean_acc"].item() == pytest.approx((2 / 3 + 2 / 2 + 2 / 3) / 3)


def test_segmentation_pooling_differs_from_per_batch_mean_and_skips_absent_classes():
    metric = SegmentationMetrics(num_classes=4, ignore_index=255)
    metric.update(torch.tensor([[0, 0, 0, 1]]), torch.tensor([[0, 0, 0, 0]]))  # IoU0 3/4, class 1 FP only
    metric.update(torch.tensor([[1]]), torch.tensor([[1]]))
    out = metric.compute()
    # class 1: inter 1, union 2 (one FP in batch 1); classes 2 and 3 never appear -> left out (nan)
    assert out["miou"].item() == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert math.isnan(out["iou"][2].item()) and math.isnan(out["iou"][3].item())
    assert out["mean_acc"].item() == pytest.approx((3 / 4 + 1) / 2)


def test_segmentation_accepts_logits():
    metric = SegmentationMetrics(num_classes=2, ignore_index=255)
    logits = torch.tensor([[[[2.0, -1.0]], [[0.0, 3.0]]]])  # [B=1, C=2, H=1, W=2] -> argmax [0, 1]
    metric.update(logits, torch.tensor([[[0, 0]]]))
    assert metric.compute()["pixel_acc"].item() == pytest.approx(0.5)


def test_depth_metrics_hand_computed_with_invalid_pixels():
    metric = DepthMetrics()
    target = torch.tensor([[1.0, 2.0, 4.0, 0.0]])  # last pixel has no depth (0) -> ignored
    pred = torch.tensor([[1.0, 2.5, 2.0, 7.0]])
    valid = torch.tensor([[True, True, True, True]])
    metric.update(pred, target, valid)
    metric.update(torch.tensor([3.0, 9.0]), torch.tensor([3.0, 1.0]), torch.tensor([True, False]))
    out = metric.compute()
    p = torch.tensor([1.0, 2.5, 2.0, 3.0], dtype=torch.float64)
    t = torch.tensor([1.0, 2.0, 4.0, 3.0], dtype=torch.float64)
    assert out["pixels"].item() == 4
    assert out["delta1"].item() == pytest.approx(2 / 4)  # ratios 1, 1.25, 2, 1: 1.25 is not < 1.25
    assert out["delta2"].item() == pytest.approx(3 / 4)
    assert out["delta3"].item() == pytest.approx(3 / 4)  # 2.0 > 1.953
    assert out["abs_rel"].item() == pytest.approx((0 + 0.25 + 0.5 + 0) / 4, rel=1e-6)
    assert out["sq_rel"].item() == pytest.approx((0 + 0.25 / 2 + 4 / 4 + 0) / 4)
    assert out["rmse"].item() == pytest.approx(math.sqrt((0 + 0.25 + 4 + 0) / 4), rel=1e-6)
    assert out["rmse_log"].item() == pytest.approx(((p.log() - t.log()) ** 2).mean().sqrt().item())
    assert out["log10"].item() == pytest.approx((p.log10() - t.log10()).abs().mean().item())


def test_depth_metrics_clamp_prediction_and_reset():
    metric = DepthMetrics(min_depth=1e-3, max_depth=10.0)
    metric.update(torch.tensor([-1.0, 20.0]), torch.tensor([1.0, 5.0]))
    out = metric.compute()
    # predictions clamped to 1e-3 and 10 m
    assert out["abs_rel"].item() == pytest.approx(((1 - 1e-3) / 1 + 5 / 5) / 2, rel=1e-6)
    metric.reset()
    metric.update(torch.tensor([2.0]), torch.tensor([2.0]))
    assert metric.compute()["rmse"].item() == pytest.approx(0.0)
    assert metric.compute()["pixels"].item() == 1
