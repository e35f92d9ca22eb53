"""Evaluation of a checkpoint on a split, one row per input combination ("what does each sensor buy me?").

A finetuned checkpoint is run with only the given inputs. A pretrained MultiMAE checkpoint is
evaluated on cross-modal prediction: every output with a task family (depth, semantic segmentation, a
plugin's) is predicted from the given inputs with every token of the predicted modality hidden. The pretrained model
predicts standardised values; its task family maps them back to the targets' units (depth: with each frame's own
robust statistics, the inverse of the standardisation in the data contract, so those numbers measure relative depth).
Each task's family (:mod:`mmtk.task`) says how it is viewed, scored and pictured.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from mmtk.runtime import pick_device, to_device
from mmtk.errors import MmtkError
from mmtk.data.info import strict_json
from mmtk.io import atomic_write, disk_errors, remove_dead_temps
from mmtk.modality import get_modality
from mmtk.evaluation.protocols import View, get_protocol
from mmtk.registry import model_from_checkpoint
from mmtk.data.contents import data_info, require_modalities
from mmtk.task import PictureStyle
from mmtk.visualize import label_palette


@dataclass
class EvalRow:
    """Metrics of one (input combination, task) over the evaluated frames."""

    inputs: tuple[str, ...]
    task: str
    frames: int
    metrics: dict[str, float]
    per_class: dict[str, list[float]] = field(default_factory=dict)  # the family's details (semseg: iou, ...)
    note: str = ""
    rescaled: bool = False  # a pretrained model's values, rescaled per frame to the ground truth (TaskFamily.rescaled)


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


def _predict(model: nn.Module, kind: str, batch: dict[str, Tensor], combo: tuple[str, ...],
             tasks: tuple[str, ...], full_size: tuple[int, int]) -> dict[str, Tensor | None]:
    """Predictions per task as its family scores them: a head's output, or a pretrained model's standardised
    prediction mapped by the family to the targets' units (class logits [B, C, H, W], depth metres [B, 1, H, W])."""
    if kind == "finetune":
        return {tasks[0]: model({name: batch[name] for name in combo})}
    preds: dict[str, Tensor | None] = {}
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
        preds[task] = get_modality(task).family().from_pretrained(out.preds[task], batch, task, full_size)
    return preds


@torch.no_grad()
def evaluate(checkpoint: str | Path, data: str | Path, input_sets: list[str] | None = None, split: str = "test",
             limit: int | None = None, batch_size: int = 4, device: str = "auto",
             save_predictions: str | Path | None = None, protocol: str = "standard",
             model: nn.Module | None = None) -> tuple[list[EvalRow], int]:
    """Evaluate ``checkpoint`` on the ``split`` of ``data`` for each input combination under ``protocol`` (a name
    of :data:`mmtk.evaluation.protocols.PROTOCOLS`: which part of each frame the model sees and how it is scored).
    ``model``: the checkpoint's model already loaded (:func:`load_trained_model`), when several datasets are
    evaluated with it.

    Returns (rows, frames used): all frames of the split, or the first ``limit``.
    """
    if limit is not None and limit <= 0:
        raise MmtkError(f"--limit must be > 0, got {limit}")
    if batch_size <= 0:
        raise MmtkError(f"--batch-size must be > 0, got {batch_size}")
    chosen = get_protocol(protocol)
    torch_device = pick_device(device)
    model = load_trained_model(checkpoint, torch_device) if model is None else model.to(torch_device)
    config = model.config
    kind = "pretrain" if config.head is None else "finetune"
    available = tuple(config.inputs)
    if kind == "finetune":
        tasks: tuple[str, ...] = (config.task,)
    else:
        tasks = tuple(t for t in config.outputs if get_modality(t).task_family is not None)
        if not tasks:
            raise MmtkError(f"{checkpoint}: the pretrained model predicts no output with a metric (such as depth or "
                            f"semseg); nothing to evaluate")
    info = data_info(data, split)
    for task in tasks:  # a relative pseudo-label holds no metres to score against
        get_modality(task).family().check_units(task, info.units.get(task), str(data))
    labelled = [n for n in dict.fromkeys(available + tasks)
                if get_modality(n).task_family is not None and get_modality(n).family().class_labels]
    skipped_labels, skipped_tasks = "", []
    if labelled and info.num_classes and info.num_classes != config.num_classes:
        why = f"{checkpoint} knows {config.num_classes} semantic classes but {data} is labelled with {info.num_classes}"
        available = tuple(n for n in available if n not in labelled)
        skipped_tasks, tasks = [t for t in tasks if t in labelled], tuple(t for t in tasks if t not in labelled)
        if kind == "finetune" or not tasks or not available:
            raise MmtkError(f"{why}; evaluate on data labelled in the model's classes")
        skipped_labels = f"not evaluated: {why}"  # a pretrained model's depth is still evaluated
    combos = parse_input_sets(input_sets, available)
    wanted = tuple(dict.fromkeys(available + tasks))
    require_modalities(wanted, info, f"evaluating {checkpoint}",
                       fix="pass --data with a file that has it (e.g. the file the run trained on)")
    frames = min(info.frames, limit or info.frames)
    if frames == 0:
        raise MmtkError(f"split '{split}' of {data} has no frames; pick another with --split")
    num_classes = config.num_classes
    metrics = {}
    skipped: set[tuple[tuple[str, ...], str]] = set()
    saver = PredictionWriter(save_predictions, num_classes, info, kind != "finetune") if save_predictions else None
    frame_size, views = tuple(info.image_size), {}
    for task in tasks:  # tasks the protocol shows alike share one pass over the split
        family = get_modality(task).family()
        view = family.view(chosen, frame_size, tuple(config.image_size))
        views.setdefault(view, []).append(task)
        metrics.update({(combo, task): family.metric(get_modality(task), num_classes, chosen, view, frame_size)
                        for combo in combos})
    for view, group in views.items():
        seen = 0
        for batch in DataLoader(_ProtocolFrames(data, split, wanted, tuple(group), view, frames),
                                batch_size=batch_size):
            batch = to_device(batch, torch_device)
            for combo in combos:
                preds = _predict(model, kind, _padded(batch, combo, view), combo, tuple(group),
                                 view.padded_size or view.input_size)
                for task, pred in preds.items():
                    if pred is None:
                        skipped.add((combo, task))
                        continue
                    family = get_modality(task).family()
                    pred = _to_target(pred.float(), view).cpu()
                    family.update(metrics[combo, task], pred,
                                  {key: batch[key].cpu() for key in family.targets(task)}, task)
                    if saver:
                        saver.write(batch, pred, combo, task, seen)
            seen += next(iter(batch.values())).shape[0]
    rows = [EvalRow(combo, task, frames, {}, note=skipped_labels) for combo in combos for task in skipped_tasks]
    for (combo, task), metric in metrics.items():
        if (combo, task) in skipped:
            rows.append(EvalRow(combo, task, frames, {}, note=f"no input left once {task} is hidden"))
            continue
        result, family = metric.compute(), get_modality(task).family()
        rows.append(EvalRow(combo, task, frames, {column.key: float(result[column.key]) for column in family.columns}
                            | {"pixels": int(result["pixels"])}, family.details(result),
                            note=_pretrained_note(kind, combo, task), rescaled=kind != "finetune" and family.rescaled))
    return rows, frames


class _ProtocolFrames(Dataset):
    """The first ``frames`` frames of a split as a protocol's view shows them: inputs (and the tasks) read from
    ``view.window`` at ``view.input_size``; the tasks' targets at ``view.target_size`` when that differs."""

    def __init__(self, data: str | Path, split: str, wanted: tuple[str, ...], tasks: tuple[str, ...], view: View,
                 frames: int) -> None:
        from mmtk.data import H5Dataset

        self.inputs = H5Dataset(data, split, wanted, view.input_size, window=view.window)
        self.targets = None if view.target_size == view.input_size else \
            H5Dataset(data, split, tasks, view.target_size, window=view.window)
        self.target_keys = {key for task in tasks for key in get_modality(task).family().targets(task)}
        self.frames = frames

    def __len__(self) -> int:
        return self.frames

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        sample = self.inputs[index]
        if self.targets is not None:
            sample.update({k: v for k, v in self.targets[index].items() if k in self.target_keys})
        return sample


def _padded(batch: dict[str, Tensor], combo: tuple[str, ...], view: View) -> dict[str, Tensor]:
    """The inputs of ``combo`` padded at the bottom and right to ``view.padded_size`` (a prepared tensor at
    1/stride keeps its stride); the pad is 0 (the mean of normalised inputs) or the modality's ignore index."""
    if view.padded_size is None:
        return batch
    padded = dict(batch)
    for name in combo:
        x = batch[name]
        stride = view.input_size[0] // x.shape[-2]
        rows, cols = view.padded_size[0] // stride - x.shape[-2], view.padded_size[1] // stride - x.shape[-1]
        fill = get_modality(name).ignore_index
        padded[name] = F.pad(x, (0, cols, 0, rows), value=0 if fill is None else fill)
    return padded


def _to_target(pred: Tensor, view: View) -> Tensor:
    """A prediction [B, C, H, W] on the model's input, cropped to the frame's pixels and resized to the target size."""
    pred = pred[..., : view.input_size[0], : view.input_size[1]]
    if tuple(pred.shape[-2:]) == tuple(view.target_size):
        return pred
    return F.interpolate(pred, size=view.target_size, mode="bilinear", align_corners=False)


def _pretrained_note(kind: str, combo: tuple[str, ...], task: str) -> str:
    """Why a pretrained model's row equals another: the predicted modality is hidden, so it is no input."""
    if kind == "finetune" or task not in combo:
        return ""
    given = ",".join(name for name in combo if name != task)
    return f"{task} is hidden when it is the target, so this row predicts from {given} alone (as --inputs {given} would)"


def results_json(checkpoint: str | Path, data: str | Path, split: str, frames: int, rows: list[EvalRow],
                 protocol: str = "standard") -> str:
    """The results of :func:`evaluate` as strict JSON, with the protocol's name and source: a metric that does not
    exist (a class absent from the split, no valid depth pixel, a metric the protocol lacks) is null, never NaN."""
    payload = {"checkpoint": str(checkpoint), "data": str(data), "split": split, "frames": frames,
               "protocol": {"name": protocol, "source": get_protocol(protocol).source},
               "results": [{"inputs": list(r.inputs), "task": r.task, "frames": r.frames, "metrics": r.metrics,
                            **({"per_class": r.per_class} if r.per_class else {}),
                            **({"note": r.note} if r.note else {}),
                            **({"values": "relative, rescaled per frame to the ground truth"}
                               if r.rescaled else {})} for r in rows]}
    return strict_json(payload)


# ---------------------------------------------------------------------------------------------
# Pictures

class PredictionWriter:
    """Writes input | prediction | ground truth side by side as PNG, with the task family's legend strip."""

    def __init__(self, folder: str | Path, num_classes: int, info: Any, rescaled: bool = False) -> None:
        self.folder = Path(folder)
        with disk_errors(self.folder):
            self.folder.mkdir(parents=True, exist_ok=True)
        remove_dead_temps(self.folder)  # once here; each picture's write skips the sweep
        names = list(info.class_names)
        # palette row 0: unlabeled (black), row k + 1: class k; rescaled: a pretrained model's values
        self.style = PictureStyle(label_palette(num_classes + 1),
                                  tuple(names + [f"class {k}" for k in range(len(names), num_classes)]), rescaled)

    def write(self, batch: dict[str, Tensor], pred: Tensor, combo: tuple[str, ...], task: str, first: int) -> None:
        from PIL import Image

        family = get_modality(task).family()
        for b in range(pred.shape[0]):
            picture = family.picture(batch, b, task, self.style, pred[b])
            panels = self._inputs(batch, b, combo) + [(f"predicted {task}", picture.prediction),
                                                      (f"ground truth {task}", picture.truth)]
            image = Image.fromarray(self._compose(panels, picture.legend))
            name = f"frame{first + b:05d}_{'+'.join(combo)}_{task}.png"
            atomic_write(self.folder / name, lambda handle: image.save(handle, format="PNG"), sweep=False)

    def _inputs(self, batch: dict[str, Tensor], b: int, combo: tuple[str, ...]) -> list[tuple[str, np.ndarray]]:
        """A labelled panel per input: its ground truth as its task family draws it (depth in metres, classes), else
        the adapter's picture of the prepared tensor; an input whose adapter draws none has no panel."""
        panels = []
        for name in combo:
            adapter = get_modality(name)
            if adapter.task_family is not None and all(key in batch for key in adapter.family().targets(name)):
                panels.append((name, adapter.family().picture(batch, b, name, self.style).truth))
                continue
            picture = adapter().picture(batch[name][b].cpu())
            if picture is not None:
                panels.append((name, picture))
        return panels

    def _compose(self, labelled: list[tuple[str, np.ndarray]], legend: Callable[[int], np.ndarray]) -> np.ndarray:
        from PIL import Image, ImageDraw

        scale = max(1, -(-160 // max(p.shape[0] for _, p in labelled)))  # small frames are enlarged (nearest)
        labelled = [(label, np.repeat(np.repeat(p, scale, axis=0), scale, axis=1)) for label, p in labelled]
        h = max(p.shape[0] for _, p in labelled)
        width = max(sum(p.shape[1] for _, p in labelled) + 4 * (len(labelled) - 1), 440)
        title = 14
        canvas = Image.new("RGB", (width, h + title + 2), "white")
        draw = ImageDraw.Draw(canvas)
        x = 0
        for label, panel in labelled:
            canvas.paste(Image.fromarray(np.ascontiguousarray(panel)), (x, title))
            draw.text((x + 2, 1), label, fill="black")
            x += panel.shape[1] + 4
        return np.concatenate([np.asarray(canvas), legend(width)])
