"""Evaluation protocols by name: which part of each frame the model sees, at what size, where and how it is scored.

``standard`` (the default) is the common NYUv2 protocol of monocular-depth and segmentation papers: the whole
frame, scored at the file's full resolution (480 x 640 for NYUv2); depth inside the Eigen crop (Eigen et al.,
NeurIPS 2014: rows 45-470, columns 41-600 of 480 x 640; other frame sizes scale it), ground truth capped at
10 m (predictions clamped to 1 mm - 10 m), metrics pooled over all pixels of all frames.

``multimae`` is the official MultiMAE evaluation (EPFL-VILAB/MultiMAE): depth as ``nyu_transform(train=False)``
in utils/dataset_regression.py (short side resized to the input size, 256 for NYUv2, then the centre crop of the
input size) scored at that size with ``masked_nyu_metrics`` of run_finetuning_depth.py, averaged over evaluation
batches (``BatchMeanDepthMetrics`` of the depth task family); semantic segmentation as ``simple_transform(train=False)``
in utils/datasets_semseg.py (longest side resized to the input size, 640 for NYUv2, padded at the bottom and
right to a square the input size) scored on the frame's pixels with mmseg's pooled ``mean_iou``.

A protocol says how it shows per-pixel values and class maps (:meth:`EvalProtocol.values_view`,
:meth:`EvalProtocol.labels_view`) and its depth rules; each task family (:mod:`mmtk.task`) picks its view and
builds its metric from them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmtk.data.transforms import CropWindow, full_window
from mmtk.errors import MmtkError

EIGEN_CROP_480x640 = (45, 471, 41, 601)  # top, bottom, left, right (exclusive) on a 480 x 640 frame


@dataclass(frozen=True)
class View:
    """How a protocol shows the frames of one task to a model and scores them.

    window: the part of the stored frame read (source pixels); input_size: the size it is resized to for the
    model; padded_size: the model's input once padded at the bottom and right (None: no padding);
    target_size: the size at which predictions are scored (resized to it when it differs)."""

    window: CropWindow
    input_size: tuple[int, int]
    target_size: tuple[int, int]
    padded_size: tuple[int, int] | None = None


class EvalProtocol:
    """A named evaluation protocol; :data:`PROTOCOLS` holds them.

    depth_range: ground truth kept in (min, max] metres, predictions clamped to it (None: no cap);
    depth_batch_frames: depth metrics per evaluation batch of this many frames, then averaged (None: pooled over
    all pixels of all frames)."""

    name: str = ""
    source: str = ""  # where it is defined, for the README, --help and the JSON record
    depth_range: tuple[float, float] | None = None
    depth_batch_frames: int | None = None

    def values_view(self, frame_size: tuple[int, int], model_size: tuple[int, int]) -> View:
        """The view of a task of per-pixel values (depth, a plugin's regression) on frames of ``frame_size``."""
        return View(full_window(*frame_size), tuple(model_size), tuple(frame_size))

    def labels_view(self, frame_size: tuple[int, int], model_size: tuple[int, int]) -> View:
        """The view of a task of class maps (segmentation) on frames of ``frame_size``."""
        return View(full_window(*frame_size), tuple(model_size), tuple(frame_size))

    def depth_region(self, frame_size: tuple[int, int], target_size: tuple[int, int]) -> torch.Tensor | None:
        """bool [H, W] at ``target_size`` of the pixels depth is scored on (None: all valid pixels)."""
        return None


class StandardProtocol(EvalProtocol):
    name = "standard"
    source = ("common NYUv2 protocol: full frame at full resolution; depth in the Eigen crop (Eigen et al. 2014), "
              "capped at 10 m, metrics pooled over all frames")

    depth_range = (1e-3, 10.0)

    def depth_region(self, frame_size: tuple[int, int], target_size: tuple[int, int]) -> torch.Tensor:
        return eigen_crop(target_size)


class MultiMAEProtocol(EvalProtocol):
    name = "multimae"
    source = ("official MultiMAE evaluation (EPFL-VILAB/MultiMAE): depth: short side to the input size, centre "
              "crop, metrics per evaluation batch of 96 frames then averaged; semseg: longest side to the input "
              "size, padded, pooled mIoU")

    depth_batch_frames = 96

    def values_view(self, frame_size: tuple[int, int], model_size: tuple[int, int]) -> View:
        """Depth's ``nyu_transform``: resized to cover the input, centre crop."""
        height, width = frame_size
        scale = max(model_size[0] / height, model_size[1] / width)
        crop_h, crop_w = min(height, round(model_size[0] / scale)), min(width, round(model_size[1] / scale))
        window = CropWindow((height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w)
        return View(window, tuple(model_size), tuple(model_size))

    def labels_view(self, frame_size: tuple[int, int], model_size: tuple[int, int]) -> View:
        """Semseg's ``simple_transform``: resized to fit the input, the rest padded."""
        height, width = frame_size
        scale = min(model_size[0] / height, model_size[1] / width)
        fitted = (round(height * scale), round(width * scale))
        padded = None if fitted == tuple(model_size) else tuple(model_size)
        return View(full_window(height, width), fitted, fitted, padded)


def eigen_crop(size: tuple[int, int]) -> torch.Tensor:
    """bool [H, W]: the Eigen crop of a 480 x 640 frame, scaled to ``size``."""
    top, bottom, left, right = EIGEN_CROP_480x640
    height, width = size
    region = torch.zeros(height, width, dtype=torch.bool)
    rows = slice(round(top * height / 480), round(bottom * height / 480))
    region[rows, round(left * width / 640):round(right * width / 640)] = True
    return region


PROTOCOLS: dict[str, EvalProtocol] = {p.name: p for p in (StandardProtocol(), MultiMAEProtocol())}


def get_protocol(name: str) -> EvalProtocol:
    """The protocol registered as ``name``; an unknown one lists the known ones."""
    if name not in PROTOCOLS:
        raise MmtkError(f"--protocol {name}: unknown evaluation protocol; choose one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]
