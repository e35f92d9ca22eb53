"""Evaluation of a checkpoint on a split, one row per input combination ("what does each sensor buy me?").

A finetuned checkpoint is run with only the given inputs. A pretrained MultiMAE checkpoint is
evaluated on cross-modal prediction: depth and semantic segmentation are predicted from the given
inputs with every token of the predicted modality hidden. The pretrained model predicts
standardised depth; it is mapped back to metres with each frame's own robust statistics (the
inverse of the standardisation in the data contract), so its depth numbers measure relative depth.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from mmtk.engine import pick_device, to_device
from mmtk.errors import MmtkError
from mmtk.metrics import DepthMetrics, SegmentationMetrics
from mmtk.predict import model_from_checkpoint
from mmtk.adapters.semseg import IGNORE_INDEX
from mmtk.data.info import strict_json
from mmtk.data.transforms import IMAGENET_MEAN, IMAGENET_STD, robust_mean_std
from mmtk.training import data_info, open_dataset, require_modalities
from mmtk.visualize import colorize_depth, label_palette

SEG_KEYS = ("miou", "pixel_acc", "mean_acc")
DEPTH_KEYS = ("delta1", "delta2", "delta3", "abs_rel", "sq_rel", "rmse", "rmse_log", "log10")


@dataclass
class EvalRow:
    """Metrics of one (input combination, task) over the evaluated frames."""

    inputs: tuple[str, ...]
    task: str
    frames: int
    metrics: dict[str, float]
    per_class: dict[str, list[float]] = field(default_factory=dict)  # semseg: iou, intersection, union
    note: str = ""


def load_trained_model(path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild the model a weights file describes (an mmtk run's checkpoint, an official MultiMAE file, a model
    folder, ...), with its weights, in eval mode."""
    return model_from_checkpoint(path).to(device).eval()


def parse_input_sets(values: list[str] | None, available: tuple[str, ...]) -> list[tuple[str, ...]]:
    """``["rgb", "depth", "rgb,depth"]`` -> [("rgb",), ("depth",), ("rgb", "depth")]; default: each alone and all."""
    if not values:
        sets = [(name,) for name in available] + ([tuple(available)] if len(available) > 1 else [])
    else:
        sets = [tuple(dict.fromkeys(p.strip() for p in value.split(",") if p.strip())) for value in values]
    for combo in sets:
        unknown = [name for name in combo if name not in available]
        if not combo or unknown:
            raise MmtkError(f"--inputs {','.join(combo) or '(empty)'}: the model takes {', '.join(available)}; "
                            f"choose among those")
    return sets


def robust_stats(depth_m: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Per-frame robust mean and std of the valid depths, as the data standardises them.

    depth_m, valid: [B, 1, H, W] -> (m, s) each [B, 1, 1, 1]; a frame without valid depth gives (0, 1).
    """
    stats = []
    for d, v in zip(depth_m.cpu().numpy(), valid.cpu().numpy()):
        values = d[v.astype(bool) & (d > 0)]
        stats.append(robust_mean_std(values) if values.size else (0.0, 1.0))
    mean, std = torch.tensor(stats, dtype=depth_m.dtype, device=depth_m.device).unbind(1)
    return mean.view(-1, 1, 1, 1), std.view(-1, 1, 1, 1)


def _predict(model: nn.Module, kind: str, batch: dict[str, Tensor], combo: tuple[str, ...],
             tasks: tuple[str, ...]) -> dict[str, Tensor | None]:
    """Predictions at full resolution per task: semseg logits [B, C, H, W], depth metres [B, 1, H, W]."""
    if kind == "finetune":
        return {tasks[0]: model({name: batch[name] for name in combo})}
    preds: dict[str, Tensor | None] = {}
    full_size = batch["rgb"].shape[-2:] if "rgb" in batch else batch["depth_m"].shape[-2:]
    for task in tasks:
        given = tuple(name for name in combo if name != task)  # the predicted modality is fully hidden
        if not given:
            preds[task] = None
            continue
        inputs = {name: batch[name] for name in given}
        tokens = (full_size[0] // model.config.patch_size) * (full_size[1] // model.config.patch_size)
        masks = {name: torch.zeros(batch[name].shape[0], tokens, dtype=torch.bool, device=batch[name].device)
                 for name in given}
        out = model(inputs, masks=masks)
        pred = out.preds[task]
        if task == "depth":
            mean, std = robust_stats(batch["depth_m"], batch["depth_valid"])
            preds[task] = pred.float() * std + mean
        else:
            preds[task] = F.interpolate(pred.float(), size=full_size, mode="bilinear", align_corners=False)
    return preds


@torch.no_grad()
def evaluate(checkpoint: str | Path, data: str | Path, input_sets: list[str] | None = None, split: str = "test",
             limit: int | None = None, batch_size: int = 4, device: str = "auto",
             save_predictions: str | Path | None = None) -> tuple[list[EvalRow], int]:
    """Evaluate ``checkpoint`` on the ``split`` of ``data`` for each input combination.

    Returns (rows, frames used). Metrics are pooled over all frames of the split (or the first
    ``limit`` frames).
    """
    if limit is not None and limit <= 0:
        raise MmtkError(f"--limit must be > 0, got {limit}")
    if batch_size <= 0:
        raise MmtkError(f"--batch-size must be > 0, got {batch_size}")
    torch_device = pick_device(device)
    model = load_trained_model(checkpoint, torch_device)
    config = model.config
    kind = "pretrain" if config.head is None else "finetune"
    available = tuple(config.inputs)
    if kind == "finetune":
        tasks: tuple[str, ...] = (config.task,)
    else:
        tasks = tuple(t for t in ("semseg", "depth") if t in config.outputs)
        if not tasks:
            raise MmtkError(f"{checkpoint}: the pretrained model predicts neither depth nor semseg; nothing to evaluate")
    info = data_info(data, split)
    skipped_semseg = ""
    if "semseg" in available + tasks and info.num_classes and info.num_classes != config.num_classes:
        why = f"{checkpoint} knows {config.num_classes} semantic classes but {data} is labelled with {info.num_classes}"
        available, tasks = tuple(n for n in available if n != "semseg"), tuple(t for t in tasks if t != "semseg")
        if kind == "finetune" or not tasks or not available:
            raise MmtkError(f"{why}; evaluate on data labelled in the model's classes")
        skipped_semseg = f"not evaluated: {why}"  # a pretrained model's depth is still evaluated
    combos = parse_input_sets(input_sets, available)
    wanted = tuple(dict.fromkeys(available + tasks))
    require_modalities(wanted, info, f"evaluating {checkpoint}")
    dataset = open_dataset(data, split, wanted, tuple(config.image_size), augment=False)
    frames = len(dataset) if limit is None else min(limit, len(dataset))
    if frames == 0:
        raise MmtkError(f"split '{split}' of {data} has no frames; pick another with --split")
    loader = DataLoader(Subset(dataset, range(frames)), batch_size=batch_size, shuffle=False)
    num_classes = config.num_classes
    metrics = {(combo, task): SegmentationMetrics(num_classes) if task == "semseg" else DepthMetrics()
               for combo in combos for task in tasks}
    skipped: set[tuple[tuple[str, ...], str]] = set()
    saver = PredictionWriter(save_predictions, num_classes, info) if save_predictions else None
    seen = 0
    for batch in loader:
        batch = to_device(batch, torch_device)
        for combo in combos:
            for task, pred in _predict(model, kind, batch, combo, tasks).items():
                if pred is None:
                    skipped.add((combo, task))
                    continue
                pred = pred.cpu()
                if task == "semseg":
                    metrics[combo, task].update(pred, batch["semseg_full"].cpu())
                else:
                    metrics[combo, task].update(pred, batch["depth_m"].cpu(), batch["depth_valid"].cpu())
                if saver:
                    saver.write(batch, pred, combo, task, seen)
        seen += next(iter(batch.values())).shape[0]
    rows = [EvalRow(combo, "semseg", frames, {}, note=skipped_semseg) for combo in combos] if skipped_semseg else []
    for (combo, task), metric in metrics.items():
        if (combo, task) in skipped:
            rows.append(EvalRow(combo, task, frames, {}, note=f"no input left once {task} is hidden"))
            continue
        result = metric.compute()
        keys = SEG_KEYS if task == "semseg" else DEPTH_KEYS
        row = EvalRow(combo, task, frames, {k: float(result[k]) for k in keys} | {"pixels": int(result["pixels"])})
        if task == "semseg":
            row.per_class = {k: [float(x) for x in result[k]] for k in ("iou", "intersection", "union")}
        rows.append(row)
    return rows, frames


def results_json(checkpoint: str | Path, data: str | Path, split: str, frames: int, rows: list[EvalRow]) -> str:
    """The results of :func:`evaluate` as strict JSON: a metric that does not exist (a class absent from the
    split, no valid depth pixel) is null, never NaN."""
    payload = {"checkpoint": str(checkpoint), "data": str(data), "split": split, "frames": frames,
               "results": [{"inputs": list(r.inputs), "task": r.task, "frames": r.frames, "metrics": r.metrics,
                            **({"per_class": r.per_class} if r.per_class else {}),
                            **({"note": r.note} if r.note else {})} for r in rows]}
    return strict_json(payload)


# ---------------------------------------------------------------------------------------------
# Pictures

class PredictionWriter:
    """Writes input | prediction | ground truth side by side as PNG, with a legend strip."""

    def __init__(self, folder: str | Path, num_classes: int, info: Any) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.palette = label_palette(num_classes + 1)  # row 0: unlabeled (black), row k + 1: class k
        names = list(info.class_names)
        self.names = names + [f"class {k}" for k in range(len(names), num_classes)]

    def write(self, batch: dict[str, Tensor], pred: Tensor, combo: tuple[str, ...], task: str, first: int) -> None:
        from PIL import Image

        for b in range(pred.shape[0]):
            panels, labels = self._inputs(batch, b, combo), list(combo)
            if task == "semseg":
                target = batch["semseg_full"][b].cpu().numpy()
                guess = pred[b].argmax(0).numpy()
                guess_img, target_img = self._seg(guess), self._seg(target)
                present = np.unique(np.concatenate([guess.ravel(), target.ravel()]))
                legend = ("classes", [int(c) for c in present if c != IGNORE_INDEX])
            else:
                target = batch["depth_m"][b, 0].cpu().numpy()
                valid = batch["depth_valid"][b, 0].cpu().numpy().astype(bool) & (target > 0)
                lo, hi = (float(target[valid].min()), float(target[valid].max())) if valid.any() else (0.0, 10.0)
                guess_img = colorize_depth(pred[b, 0].numpy(), value_range=(lo, hi))
                target_img = colorize_depth(np.where(valid, target, 0), value_range=(lo, hi))
                legend = ("depth", lo, hi)
            panels += [guess_img, target_img]
            labels += [f"predicted {task}", f"ground truth {task}"]
            image = self._compose(panels, labels, legend)
            name = f"frame{first + b:05d}_{'+'.join(combo)}_{task}.png"
            tmp = self.folder / f".{name}.tmp.png"
            Image.fromarray(image).save(tmp)
            tmp.replace(self.folder / name)

    def _inputs(self, batch: dict[str, Tensor], b: int, combo: tuple[str, ...]) -> list[np.ndarray]:
        panels = []
        for name in combo:
            if name == "rgb":
                rgb = (batch["rgb"][b].cpu() * IMAGENET_STD + IMAGENET_MEAN).clamp(0, 1)
                panels.append((rgb.permute(1, 2, 0).numpy() * 255).astype(np.uint8))
            elif name == "depth" and "depth_m" in batch:
                d = batch["depth_m"][b, 0].cpu().numpy()
                panels.append(colorize_depth(d, value_range=(float(d[d > 0].min()), float(d.max())) if (d > 0).any() else None))
            elif name == "semseg":
                labels = batch["semseg_full"][b].cpu().numpy() if "semseg_full" in batch else batch["semseg"][b].cpu().numpy()
                panels.append(self._seg(labels))
        return panels

    def _seg(self, labels: np.ndarray) -> np.ndarray:
        return self.palette[np.where(labels == IGNORE_INDEX, 0, np.clip(labels, 0, len(self.palette) - 2) + 1)]

    def _compose(self, panels: list[np.ndarray], labels: list[str], legend: tuple) -> np.ndarray:
        from PIL import Image, ImageDraw

        scale = max(1, -(-160 // max(p.shape[0] for p in panels)))  # small frames are enlarged (nearest)
        panels = [np.repeat(np.repeat(p, scale, axis=0), scale, axis=1) for p in panels]
        h = max(p.shape[0] for p in panels)
        width = max(sum(p.shape[1] for p in panels) + 4 * (len(panels) - 1), 440)
        columns = width // 110
        rows = 1 + (len(legend[1]) - 1) // columns if legend[0] == "classes" and legend[1] else 2
        title = 14
        canvas = Image.new("RGB", (width, h + title + 16 * rows + 4), "white")
        draw = ImageDraw.Draw(canvas)
        x = 0
        for panel, label in zip(panels, labels):
            canvas.paste(Image.fromarray(np.ascontiguousarray(panel)), (x, title))
            draw.text((x + 2, 1), label, fill="black")
            x += panel.shape[1] + 4
        y = h + title + 2
        if legend[0] == "classes":
            for i, k in enumerate(legend[1]):
                cx, cy = 4 + (i % columns) * 110, y + (i // columns) * 16
                draw.rectangle([cx, cy, cx + 10, cy + 10], fill=tuple(int(v) for v in self.palette[k + 1]))
                draw.text((cx + 14, cy), self.names[k][:15] if k < len(self.names) else str(k), fill="black")
        else:
            _, lo, hi = legend
            bar = colorize_depth(np.tile(np.linspace(lo, hi, 200), (10, 1)), np.ones((10, 200), bool), (lo, hi))
            canvas.paste(Image.fromarray(bar), (60, y))
            draw.text((4, y), f"{lo:.2f} m", fill="black")
            draw.text((264, y), f"{hi:.2f} m", fill="black")
            draw.text((4, y + 14), "depth (black: no measurement)", fill="black")
        return np.asarray(canvas)
