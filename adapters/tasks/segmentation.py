"""Semantic segmentation: cross-entropy on class logits, scored by mIoU, pixel and mean class accuracy (in %).

Targets are the full-resolution class ids ``<task>_full`` [B, H, W] (0-based, the adapter's ``ignore_index`` for
unlabeled pixels). The metrics are pooled over a whole split (one confusion matrix), not averaged per batch: a
:class:`torchmetrics.Metric` whose state is a sum, so it also pools across DDP processes.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import MulticlassConfusionMatrix

from mmtk.modality import get_modality
from mmtk.task import Column, EvalPicture, LossSettings, PictureStyle, TaskFamily, register_task_family
from mmtk.visualize import class_legend


class SegmentationMetrics(Metric):
    """mIoU, pixel accuracy, mean class accuracy, per-class intersection and union, pooled over all pixels.

    ``update(pred, target)``: ``pred`` class ids [B, H, W] or logits [B, C, H, W]; ``target`` class
    ids [B, H, W] with ``ignore_index`` for unlabeled pixels. mIoU and mean accuracy average over the
    classes that occur (union > 0, resp. ground-truth pixels > 0) in the evaluated frames. The confusion
    matrix is torchmetrics' :class:`MulticlassConfusionMatrix` (ignored labels dropped).
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


def segmentation_loss(logits: Tensor, target: Tensor, ignore_index: int) -> Tensor:
    """Cross-entropy at full resolution, unlabeled pixels ignored; mean per image, then over images.

    logits: [B, C, H, W]; target: [B, H, W].
    """
    pixel = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none")  # [B, H, W]
    labelled = (target != ignore_index).flatten(1)
    return (pixel.flatten(1).sum(1) / labelled.sum(1).clamp(min=1)).mean()


@register_task_family
class Segmentation(TaskFamily):
    name = "segmentation"
    title = "semantic segmentation"
    losses = {"ce": segmentation_loss}
    columns = (Column("miou", "mIoU %", percent=True), Column("pixel_acc", "pixel acc %", percent=True),
               Column("mean_acc", "mean acc %", percent=True))
    class_labels = True

    def targets(self, task: str) -> tuple[str, ...]:
        return (f"{task}_full",)

    def loss(self, pred: Tensor, batch: dict[str, Tensor], task: str, settings: LossSettings) -> Tensor:
        return self.losses[settings.loss](pred, batch[f"{task}_full"], get_modality(task).ignore_index)

    def metric(self, adapter, num_classes: int, protocol, view, frame_size: tuple[int, int]) -> Metric:
        return SegmentationMetrics(num_classes, adapter.ignore_index)

    def update(self, metric: Metric, pred: Tensor, batch: dict[str, Tensor], task: str) -> None:
        metric.update(pred, batch[f"{task}_full"])

    def details(self, result: dict[str, Tensor]) -> dict[str, list[float]]:
        return {key: [float(x) for x in result[key]] for key in ("iou", "intersection", "union")}

    def view(self, protocol, frame_size: tuple[int, int], model_size: tuple[int, int]):
        return protocol.labels_view(frame_size, model_size)

    def from_pretrained(self, pred: Tensor, batch: dict[str, Tensor], task: str, size: tuple[int, int]) -> Tensor:
        return F.interpolate(pred.float(), size=size, mode="bilinear", align_corners=False)  # logits

    def output_name(self, task: str) -> str:
        return f"{task}_logits"

    def picture(self, batch: dict[str, Tensor], index: int, task: str, style: PictureStyle,
                pred: Tensor | None = None) -> EvalPicture:
        target = batch[f"{task}_full"][index].cpu().numpy()
        guess = None if pred is None else pred.argmax(0).numpy()
        shown = target if guess is None else np.concatenate([guess.ravel(), target.ravel()])
        ignore = get_modality(task).ignore_index
        present = [int(c) for c in np.unique(shown) if c != ignore]
        return EvalPicture(_colours(target, style.palette), None if guess is None else _colours(guess, style.palette),
                           lambda width: class_legend(width, style.palette, present, style.class_names))


def _colours(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] of 0-based class ids in ``palette`` (row k + 1); the ignore index (beyond the classes) black."""
    known = (labels >= 0) & (labels < len(palette) - 1)
    return palette[np.where(known, labels + 1, 0)]
