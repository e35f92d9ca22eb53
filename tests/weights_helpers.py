"""Helpers of the weights, predict and export tests: a strict JSON parser, metrics computed outside `mmtk eval`, and
tiny models saved as the engine saves them."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

import mmtk
from mmtk.adapters.tasks.depth import DepthMetrics
from mmtk.adapters.tasks.segmentation import SegmentationMetrics
from mmtk.evaluation.protocols import eigen_crop
from mmtk.data.contents import open_dataset

SIZE = (64, 64)  # the image size of the test models (their positional grid x 16)


def strict_loads(text: str):
    """json.loads that refuses NaN and infinities, as strict parsers do."""
    def refuse(constant: str):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def reference_metrics(model: torch.nn.Module, data: Path, inputs: tuple[str, ...], task: str) -> dict[str, float]:
    """The metrics of `model` run on the test split of `data` prepared at SIZE, frame by frame, scored as the
    standard protocol does: upsampled to the file's frame size, depth inside the Eigen crop."""
    dataset = open_dataset(data, "test", ("rgb", "depth", "semseg"), SIZE, augment=False)
    targets = open_dataset(data, "test", ("depth", "semseg"), None, augment=False)
    metric = SegmentationMetrics(40, ignore_index=255) if task == "semseg" else DepthMetrics()
    with torch.no_grad():
        for i in range(len(dataset)):
            frame = {k: v[None] for k, v in dataset[i].items()}
            target = {k: v[None] for k, v in targets[i].items()}
            pred = model({name: frame[name] for name in inputs}).float()
            pred = F.interpolate(pred, size=target["depth_m"].shape[-2:], mode="bilinear", align_corners=False)
            if task == "semseg":
                metric.update(pred, target["semseg_full"])
            else:
                region = eigen_crop(tuple(target["depth_m"].shape[-2:]))
                metric.update(pred, target["depth_m"], target["depth_valid"] & region)
    return {k: float(v) for k, v in metric.compute().items() if v.ndim == 0}


def save_tiny(path: Path, **args) -> Path:
    """A randomly initialised tiny model saved like the engine's checkpoints (model_name, model_args, model)."""
    torch.manual_seed(0)
    model = mmtk.create_model("multimae-tiny", verbose=False, **args)
    if args.get("task") == "depth":  # centre the random depth head's output near 1 m, like a trained one
        with torch.no_grad():
            model.head.output[-1].bias.fill_(1.0)
    torch.save({"model_name": "multimae-tiny", "model_args": args, "model": model.state_dict()}, path)
    return path
