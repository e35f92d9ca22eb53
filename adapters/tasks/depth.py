"""Depth regression in metres: berHu or L1 on valid pixels, scored by the standard monocular-depth metrics.

Targets are the metric crop ``<task>_m`` [B, 1, H, W] (metres, 0 = no measurement) and its validity map
``<task>_valid``. The metrics are :class:`torchmetrics.Metric` objects: :class:`DepthMetrics` pools per-pixel sums
over a whole split (so it also pools across DDP processes; RMSE and AbsRel, the mean absolute percentage error,
come from torchmetrics, which has no delta-threshold, SqRel, RMSE-log or log10 metric);
:class:`BatchMeanDepthMetrics` averages per evaluation batch as the official MultiMAE evaluation does. Which one,
which pixels and which depth range an evaluation protocol asks for, it says (``depth_range``,
``depth_batch_frames``, ``depth_region``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.regression import MeanAbsolutePercentageError, MeanSquaredError

from mmtk.errors import MmtkError
from mmtk.modality import get_modality
from mmtk.task import Column, EvalPicture, LossSettings, PictureStyle, TaskFamily, register_task_family
from mmtk.visualize import colorize_depth, depth_bar

COLUMNS = (Column("delta1", "δ1 %", percent=True), Column("delta2", "δ2 %", percent=True),
           Column("delta3", "δ3 %", percent=True), Column("abs_rel", "AbsRel"), Column("sq_rel", "SqRel m"),
           Column("rmse", "RMSE m"), Column("rmse_log", "RMSE log"), Column("log10", "log10"))
KEYS = tuple(column.key for column in COLUMNS)


class DepthMetrics(Metric):
    """Standard monocular-depth metrics in metres over valid pixels, pooled over the split.

    ``update(pred, target, valid=None)``: depth in metres, any matching shape. A pixel counts when
    ``valid`` (if given) is True, it lies in ``region`` (bool [H, W], if given) and ``min_depth < target <=
    max_depth``; predictions are clamped to ``[min_depth, max_depth]`` before the metrics (the usual NYUv2
    protocol, 1e-3 to 10 m).

    Returns delta1/2/3 (share of pixels with max(p/t, t/p) < 1.25^k), abs_rel = mean |p-t|/t,
    sq_rel = mean (p-t)^2/t, rmse = sqrt(mean (p-t)^2) [m], rmse_log = sqrt(mean (ln p - ln t)^2),
    log10 = mean |log10 p - log10 t|, and ``pixels``: the number of valid pixels used.
    """

    full_state_update = False

    def __init__(self, min_depth: float = 1e-3, max_depth: float = 10.0, region: Tensor | None = None) -> None:
        super().__init__()
        self.min_depth, self.max_depth, self.region = min_depth, max_depth, region
        for name in ("pixels", "delta1", "delta2", "delta3", "sq_rel", "sq_log", "log10"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.rmse = MeanSquaredError(squared=False)
        self.abs_rel = MeanAbsolutePercentageError()

    def update(self, pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        self.accumulate(*self.scored(pred, target, valid))

    def scored(self, pred: Tensor, target: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The scored pixels: predictions clamped to the depth range and their targets, float64 [N] each."""
        keep = _scored(target, valid, self.region).reshape(-1)
        pred, target = pred.detach().double().reshape(-1), target.detach().double().reshape(-1)
        keep &= (target > self.min_depth) & (target <= self.max_depth)
        return pred[keep].clamp(self.min_depth, self.max_depth), target[keep]

    def accumulate(self, p: Tensor, t: Tensor) -> None:
        """Add scored pixels to the sums (a metric added here is one more sum, its value in :meth:`compute`)."""
        ratio = torch.maximum(p / t, t / p)
        self.pixels += p.numel()
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
            return dict.fromkeys(KEYS, torch.tensor(float("nan"), dtype=torch.float64)) | {"pixels": n}
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

    ``update(pred, target, valid=None)`` in metres, [B, ...]; frames are grouped in the order they arrive; pixels
    outside ``region`` (bool [H, W], if given) are not scored. Returns :data:`KEYS` in metres; ``rmse_log`` is what
    the official code calls ``log10`` (the RMSE of natural logs); ``log10`` itself is not computed there and is NaN.
    """

    full_state_update = False
    SUMS = ("pixels", "sq", "rel", "sq_rel", "sq_log", "delta1", "delta2", "delta3")  # per-frame sums

    def __init__(self, batch_frames: int = 96, region: Tensor | None = None) -> None:
        super().__init__()
        self.batch_frames, self.region = batch_frames, region
        self.add_state("frames", default=[], dist_reduce_fx="cat")

    def update(self, pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        p, t = pred.detach().double().flatten(1), target.detach().double().flatten(1)  # [B, P]
        keep = _scored(target, valid if valid is not None else target > 0, self.region).reshape(t.shape)
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
            return dict.fromkeys(KEYS, nan) | {"pixels": frames[:, 0].sum()}

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


def _scored(target: Tensor, valid: Tensor | None, region: Tensor | None) -> Tensor:
    """bool like ``target``: the pixels ``valid`` (all when None) marks, inside ``region`` [H, W] when given."""
    keep = torch.ones_like(target, dtype=torch.bool) if valid is None else valid.reshape(target.shape).bool()
    return keep if region is None else keep & region.to(keep.device)


def depth_loss(pred: Tensor, target: Tensor, valid: Tensor, kind: str = "berhu", reduction: str = "image",
               scale: float = 1.0) -> Tensor:
    """berHu (reverse Huber, threshold 0.2 x the largest error) or L1 on valid pixels, errors in metres / ``scale``.

    pred, target: [B, 1, H, W] metres; valid: [B, 1, H, W] bool. ``reduction`` "image": threshold and mean per
    image, then the mean over images; "batch": one threshold for the batch and the mean over all its valid pixels
    (the official MultiMAE ``masked_berhu_loss``). ``scale``: the std of ``train.target_norm`` (normalised depth
    differs from metres by it; the mean cancels in the error).
    """
    valid = valid.bool() & (target > 0)
    error = (pred.float() - target).abs() * valid / scale  # [B, 1, H, W]
    rows = 1 if reduction == "batch" else error.shape[0]
    flat, mask = error.reshape(rows, -1), valid.reshape(rows, -1)
    if kind == "berhu":
        c = (0.2 * flat.max(dim=1, keepdim=True).values).detach().clamp(min=1e-6)  # [rows, 1]
        flat = torch.where(flat <= c, flat, (flat**2 + c**2) / (2 * c)) * mask
    return (flat.sum(1) / mask.sum(1).clamp(min=1)).mean()


def berhu_loss(pred: Tensor, target: Tensor, valid: Tensor, reduction: str = "image", scale: float = 1.0) -> Tensor:
    """:func:`depth_loss` with berHu (the paper's)."""
    return depth_loss(pred, target, valid, "berhu", reduction, scale)


def l1_loss(pred: Tensor, target: Tensor, valid: Tensor, reduction: str = "image", scale: float = 1.0) -> Tensor:
    """:func:`depth_loss` with L1."""
    return depth_loss(pred, target, valid, "l1", reduction, scale)


@register_task_family
class DepthRegression(TaskFamily):
    name = "depth"
    title = "depth (metres, valid pixels)"
    losses = {"berhu": berhu_loss, "l1": l1_loss}
    columns = COLUMNS
    units = "m"
    target_norm = True
    units_fix = "use sensor depth, or pseudo-labels of a metric network (`mmtk pseudo-label --depth-kind metric`)"
    rescaled = True

    def targets(self, task: str) -> tuple[str, ...]:
        return (f"{task}_m", f"{task}_valid")

    def loss(self, pred: Tensor, batch: dict[str, Tensor], task: str, settings: LossSettings) -> Tensor:
        return self.losses[settings.loss](pred, batch[f"{task}_m"], batch[f"{task}_valid"], settings.reduction,
                                          settings.scale)

    def metric(self, adapter, num_classes: int, protocol, view, frame_size: tuple[int, int]) -> Metric:
        region = protocol.depth_region(frame_size, view.target_size)
        if protocol.depth_batch_frames:
            return BatchMeanDepthMetrics(protocol.depth_batch_frames, region)
        return DepthMetrics(*protocol.depth_range, region=region)

    def update(self, metric: Metric, pred: Tensor, batch: dict[str, Tensor], task: str) -> None:
        metric.update(pred, batch[f"{task}_m"], batch[f"{task}_valid"].bool())

    def from_pretrained(self, pred: Tensor, batch: dict[str, Tensor], task: str, size: tuple[int, int]) -> Tensor:
        values = get_modality(task)().to_units(pred.float(), batch[f"{task}_m"], batch[f"{task}_valid"])
        if values is None:  # the frame's own measurement scales it back, through its adapter
            raise MmtkError(f"a pretrained model's {task} cannot be scored in {self.units}: its adapter has no "
                            f"to_units (see Modality.to_units); add one, or evaluate a finetuned model")
        return values

    def output_name(self, task: str) -> str:
        return f"{task}_m"

    def table_title(self, rescaled: bool) -> str:
        return "relative depth (valid pixels)" if rescaled else self.title

    def header(self, column: Column, rescaled: bool) -> str:
        return column.header.replace(" m", " m*") if rescaled and column.header.endswith(" m") else column.header

    def footnote(self, rescaled: bool) -> str:
        return ("  * a pretrained model predicts relative depth: each frame's prediction is scaled and shifted to its "
                "ground truth's robust mean and spread before comparing, so these metres measure shape, not scale"
                if rescaled else "")

    def picture(self, batch: dict[str, Tensor], index: int, task: str, style: PictureStyle,
                pred: Tensor | None = None) -> EvalPicture:
        target = batch[f"{task}_m"][index, 0].cpu().numpy()
        valid = batch[f"{task}_valid"][index, 0].cpu().numpy().astype(bool) & (target > 0)
        lo, hi = (float(target[valid].min()), float(target[valid].max())) if valid.any() else (0.0, 10.0)
        caption = "depth, metres" + (" (prediction: relative depth rescaled to the ground truth)"
                                     if style.rescaled else "")
        return EvalPicture(colorize_depth(np.where(valid, target, 0), value_range=(lo, hi)),
                           None if pred is None else colorize_depth(pred[0].numpy(), value_range=(lo, hi)),
                           lambda width: depth_bar(width, lo, hi, "m", caption))
