"""Segmentation and depth metrics pooled over a whole split (not averaged per batch).

Both are :class:`torchmetrics.Metric` objects: call ``update`` per batch, ``compute`` once at the
end; their states are sums, so they also pool across DDP processes. Segmentation accumulates a
confusion matrix with torchmetrics' :class:`MulticlassConfusionMatrix` (ignored labels dropped)
and derives mIoU, pixel accuracy and mean accuracy from it. Depth accumulates per-pixel sums over
valid pixels; RMSE and AbsRel (= mean absolute percentage error) come from torchmetrics, which has no
delta-threshold, SqRel, RMSE-log or log10 metric.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.classification import MulticlassConfusionMatrix
from torchmetrics.regression import MeanAbsolutePercentageError, MeanSquaredError


# Metric families (Modality.metric_family): the finetuning losses each accepts (first = default), the
# metrics each reports and whether its targets can be normalised (train.target_norm).
FAMILIES = {
    "segmentation": {"losses": ("ce",), "keys": ("miou", "pixel_acc", "mean_acc"), "target_norm": False},
    "depth": {"losses": ("berhu", "l1"), "keys": ("delta1", "delta2", "delta3", "abs_rel", "sq_rel", "rmse", "rmse_log",
                                                   "log10"), "target_norm": True},
}


class SegmentationMetrics(Metric):
    """mIoU, pixel accuracy, mean class accuracy, per-class intersection and union, pooled over all pixels.

    ``update(pred, target)``: ``pred`` class ids [B, H, W] or logits [B, C, H, W]; ``target`` class
    ids [B, H, W] with ``ignore_index`` for unlabeled pixels. mIoU and mean accuracy average over the
    classes that occur (union > 0, resp. ground-truth pixels > 0) in the evaluated frames.
    """

    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.confusion = MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index, validate_args=False)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.ndim == target.ndim + 1:
            pred = pred.argmax(dim=1)
        self.confusion.update(pred.reshape(-1), target.reshape(-1))

    def compute(self) -> dict[str, torch.Tensor]:
        cm = self.confusion.compute().double()  # [C_true, C_pred]
        intersection = cm.diag()
        gt_pixels = cm.sum(dim=1)
        union = gt_pixels + cm.sum(dim=0) - intersection
        present = union > 0
        iou = torch.where(present, intersection / union.clamp(min=1), torch.full_like(union, float("nan")))
        has_gt = gt_pixels > 0
        class_acc = torch.where(has_gt, intersection / gt_pixels.clamp(min=1), torch.full_like(union, float("nan")))
        total = cm.sum()
        return {
            "miou": iou[present].mean() if present.any() else torch.tensor(float("nan")),
            "pixel_acc": intersection.sum() / total if total > 0 else torch.tensor(float("nan")),
            "mean_acc": class_acc[has_gt].mean() if has_gt.any() else torch.tensor(float("nan")),
            "iou": iou,
            "intersection": intersection,
            "union": union,
            "pixels": total,
        }

    def reset(self) -> None:
        super().reset()
        self.confusion.reset()


class DepthMetrics(Metric):
    """Standard monocular-depth metrics in metres over valid pixels, pooled over the split.

    ``update(pred, target, valid=None)``: depth in metres, any matching shape. A pixel counts when
    ``valid`` (if given) is True and ``min_depth < target <= max_depth``; predictions are clamped to
    ``[min_depth, max_depth]`` before the metrics (the usual NYUv2 protocol, 1e-3 to 10 m).

    Returns delta1/2/3 (share of pixels with max(p/t, t/p) < 1.25^k), abs_rel = mean |p-t|/t,
    sq_rel = mean (p-t)^2/t, rmse = sqrt(mean (p-t)^2) [m], rmse_log = sqrt(mean (ln p - ln t)^2),
    log10 = mean |log10 p - log10 t|, and ``pixels``: the number of valid pixels used.
    """

    full_state_update = False

    def __init__(self, min_depth: float = 1e-3, max_depth: float = 10.0) -> None:
        super().__init__()
        self.min_depth, self.max_depth = min_depth, max_depth
        for name in ("pixels", "delta1", "delta2", "delta3", "sq_rel", "sq_log", "log10"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.rmse = MeanSquaredError(squared=False)
        self.abs_rel = MeanAbsolutePercentageError()

    def update(self, pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        pred, target = pred.detach().double().reshape(-1), target.detach().double().reshape(-1)
        keep = (target > self.min_depth) & (target <= self.max_depth)
        if valid is not None:
            keep &= valid.reshape(-1).bool()
        p = pred[keep].clamp(self.min_depth, self.max_depth)
        t = target[keep]
        ratio = torch.maximum(p / t, t / p)
        self.pixels += keep.sum()
        self.delta1 += (ratio < 1.25).sum()
        self.delta2 += (ratio < 1.25**2).sum()
        self.delta3 += (ratio < 1.25**3).sum()
        if t.numel():
            self.rmse.update(p, t)
            self.abs_rel.update(p, t)
        self.sq_rel += ((p - t) ** 2 / t).sum()
        self.sq_log += ((p.log() - t.log()) ** 2).sum()
        self.log10 += (p.log10() - t.log10()).abs().sum()

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.pixels
        if n == 0:
            nan = torch.tensor(float("nan"), dtype=torch.float64)
            return {k: nan for k in ("delta1", "delta2", "delta3", "abs_rel", "sq_rel", "rmse", "rmse_log",
                                     "log10")} | {"pixels": n}
        return {
            "delta1": self.delta1 / n,
            "delta2": self.delta2 / n,
            "delta3": self.delta3 / n,
            "abs_rel": self.abs_rel.compute().double(),
            "sq_rel": self.sq_rel / n,
            "rmse": self.rmse.compute().double(),
            "rmse_log": (self.sq_log / n).sqrt(),
            "log10": self.log10 / n,
            "pixels": n,
        }

    def reset(self) -> None:
        super().reset()
        self.rmse.reset()
        self.abs_rel.reset()


class BatchMeanDepthMetrics(Metric):
    """Depth metrics as the official MultiMAE evaluation computes them (run_finetuning_depth.py,
    ``masked_nyu_metrics`` averaged by its metric logger): each metric over the valid pixels of one evaluation
    batch of ``batch_frames`` frames (1.5 x the training batch of 64 = 96, one process), then the plain mean over
    batches. No depth cap, no clamping of predictions (only 1e-6 guards in ratios and logs).

    ``update(pred, target, valid=None)`` in metres, [B, ...]; frames are grouped in the order they arrive.
    Returns the keys of :data:`FAMILIES` ``depth`` in metres; ``rmse_log`` is what the official code calls
    ``log10`` (the RMSE of natural logs); ``log10`` itself is not computed there and is NaN.
    """

    full_state_update = False
    SUMS = ("pixels", "sq", "rel", "sq_rel", "sq_log", "delta1", "delta2", "delta3")  # per-frame sums

    def __init__(self, batch_frames: int = 96) -> None:
        super().__init__()
        self.batch_frames = batch_frames
        self.add_state("frames", default=[], dist_reduce_fx="cat")

    def update(self, pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        p, t = pred.detach().double().flatten(1), target.detach().double().flatten(1)  # [B, P]
        keep = (t > 0) if valid is None else valid.reshape(t.shape).bool()
        diff = (p - t).abs() * keep
        ratio = torch.maximum(p / t.clamp_min(1e-6), t / p.clamp_min(1e-6))
        log_diff = (p.clamp_min(1e-6).log() - t.clamp_min(1e-6).log()) * keep
        sums = [keep.sum(1), diff.square().sum(1), (diff / t.clamp_min(1e-6)).sum(1),
                (diff.square() / t.clamp_min(1e-6)).sum(1), log_diff.square().sum(1)]
        sums += [((ratio < 1.25**k) & keep).sum(1) for k in (1, 2, 3)]
        self.frames.append(torch.stack([s.double() for s in sums], dim=1))  # [B, 8]

    def compute(self) -> dict[str, torch.Tensor]:
        frames = torch.cat(self.frames) if isinstance(self.frames, list) and self.frames else self.frames
        if isinstance(frames, list):  # nothing was updated
            frames = torch.zeros(0, len(self.SUMS), dtype=torch.float64)
        per_batch = [dict(zip(self.SUMS, chunk.sum(0))) for chunk in frames.split(self.batch_frames)]
        per_batch = [s for s in per_batch if s["pixels"] > 0]
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        if not per_batch:
            return dict.fromkeys(FAMILIES["depth"]["keys"], nan) | {"pixels": frames[:, 0].sum()}

        def mean(value) -> torch.Tensor:
            return torch.stack([value(s) for s in per_batch]).mean()

        return {
            "delta1": mean(lambda s: s["delta1"] / s["pixels"]),
            "delta2": mean(lambda s: s["delta2"] / s["pixels"]),
            "delta3": mean(lambda s: s["delta3"] / s["pixels"]),
            "abs_rel": mean(lambda s: s["rel"] / s["pixels"]),
            "sq_rel": mean(lambda s: s["sq_rel"] / s["pixels"]),
            "rmse": mean(lambda s: (s["sq"] / s["pixels"]).sqrt()),
            "rmse_log": mean(lambda s: (s["sq_log"] / s["pixels"]).sqrt()),
            "log10": nan,
            "pixels": frames[:, 0].sum(),
        }
