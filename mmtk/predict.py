"""Prediction helpers: reading user images, colour maps for depth and labels, per-frame point clouds.

(The model-driven part of ``mmtk predict`` lives further down, once the model core is available.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmtk.errors import MmtkError

# Viridis at 0, 1/4, 1/2, 3/4, 1 (perceptually uniform; near = dark, far = bright).
_DEPTH_STOPS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)


def colorize_depth(depth: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """uint8 RGB [H, W, 3] from depth [H, W]: viridis over the 2-98% range of valid pixels; invalid -> black."""
    depth = np.asarray(depth, dtype=np.float64)
    if valid is None:
        valid = np.isfinite(depth) & (depth > 0)
    image = np.zeros((*depth.shape, 3), dtype=np.uint8)
    if not valid.any():
        return image
    low, high = np.percentile(depth[valid], [2, 98])
    scaled = np.clip((depth[valid] - low) / max(high - low, 1e-9), 0, 1) * (len(_DEPTH_STOPS) - 1)
    position = np.arange(len(_DEPTH_STOPS))
    image[valid] = np.stack([np.interp(scaled, position, _DEPTH_STOPS[:, c]) for c in range(3)], -1).round()
    return image


def label_palette(num_labels: int) -> np.ndarray:
    """uint8 [num_labels, 3]: label 0 black (unlabeled), others distinct colours from spreading the label's
    bits over the high bits of R, G and B (deterministic, neighbours differ strongly)."""
    palette = np.zeros((num_labels, 3), dtype=np.uint8)
    for label in range(1, num_labels):
        value, rgb = label, [0, 0, 0]
        for bit in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= ((value >> channel) & 1) << bit
            value >>= 3
        palette[label] = rgb
    return palette


def colorize_labels(labels: np.ndarray, num_labels: int | None = None) -> np.ndarray:
    """uint8 RGB [H, W, 3] from integer labels [H, W] (HDF5 convention: 0 = unlabeled, black)."""
    labels = np.asarray(labels).astype(np.int64)
    count = int(labels.max()) + 1 if num_labels is None else num_labels
    return label_palette(max(count, int(labels.max()) + 1))[labels]


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """uint8 RGB [H, W, 3] from an image file; an unreadable file is a clear MmtkError."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))
    except FileNotFoundError as err:
        raise MmtkError(f"{path}: no such image file") from err
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise MmtkError(f"{path}: cannot read as an image ({type(err).__name__}); give a PNG/JPEG/TIFF file") from err


def read_depth(path: str | os.PathLike, depth_scale: float | None = None) -> np.ndarray:
    """Depth in metres, float32 [H, W], 0 = invalid, from an image (PNG/TIFF) or ``.npy`` file.

    Integer images are divided by ``depth_scale`` (units per metre: 1000 for millimetres, the default; 5000 for
    TUM RGB-D). Float images and ``.npy`` arrays are taken as metres unless ``depth_scale`` is given.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if depth_scale is not None and depth_scale <= 0:
        raise MmtkError(f"--depth-scale {depth_scale}: must be positive (units per metre, e.g. 1000 for mm)")
    try:
        if path.suffix.lower() == ".npy":
            raw = np.load(path, allow_pickle=False)
        else:
            with Image.open(path) as image:
                raw = np.array(image)
    except FileNotFoundError as err:
        raise MmtkError(f"{path}: no such depth file") from err
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise MmtkError(f"{path}: cannot read as a depth image ({type(err).__name__}); give a 16-bit PNG, "
                        "TIFF or .npy") from err
    if raw.ndim != 2:
        raise MmtkError(f"{path}: depth must be a single-channel image, got shape {raw.shape}")
    scale = depth_scale if depth_scale is not None else (1000.0 if np.issubdtype(raw.dtype, np.integer) else 1.0)
    depth = raw.astype(np.float32) / np.float32(scale)
    return np.where(np.isfinite(depth) & (depth > 0), depth, 0.0).astype(np.float32)


@dataclass
class Frame:
    """One RGB-D frame as the point-cloud and prediction commands use it."""

    rgb: np.ndarray  # uint8 [H, W, 3]
    depth: np.ndarray | None  # float32 [H, W] metres, 0 = invalid
    intrinsics: np.ndarray | None  # float32 [3, 3] pixels
    labels: np.ndarray | None = None  # int [H, W], 0 = unlabeled
    num_labels: int | None = None


METRE_UNITS = ("m", "metre", "metres", "meter", "meters")


def read_h5_frame(path: str | os.PathLike, split: str, index: int, depth_key: str = "depth",
                  label_key: str | None = None) -> Frame:
    """Frame ``index`` of ``split`` from an mmtk HDF5 file; depth must be metric (units attr "m")."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise MmtkError(f"{path}: no such HDF5 file")
    with h5py.File(path, "r") as handle:
        if split not in handle:
            raise MmtkError(f"{path}: no split {split!r}; splits: {sorted(handle)}")
        group = handle[split]
        count = group["rgb"].shape[0]
        if not -count <= index < count:
            raise MmtkError(f"{path}: split {split!r} has {count} frames; index {index} is out of range")
        depth = None
        if depth_key:
            if depth_key not in group:
                raise MmtkError(f"{path}: split {split!r} has no dataset {depth_key!r}; datasets: {sorted(group)}")
            units = str(group[depth_key].attrs.get("units", "m"))
            if units not in METRE_UNITS:
                raise MmtkError(f"{path}: {split}/{depth_key} is in {units!r} units, not metres; a point cloud "
                                "needs metric depth (use the sensor depth or a metric model)")
            depth = np.asarray(group[depth_key][index], dtype=np.float32)
        intrinsics = np.asarray(group["intrinsics"][index], np.float32) if "intrinsics" in group else None
        labels = num_labels = None
        if label_key:
            if label_key not in group:
                raise MmtkError(f"{path}: split {split!r} has no dataset {label_key!r}; datasets: {sorted(group)}")
            labels = np.asarray(group[label_key][index])
            classes = group[label_key].attrs.get("classes")
            if classes is not None:
                import json
                num_labels = len(json.loads(classes)) + 1
        return Frame(np.asarray(group["rgb"][index]), depth, intrinsics, labels, num_labels)
