"""Colour maps for pictures of depth and labels (prediction PNGs, evaluation panels, coloured point clouds)."""

from __future__ import annotations

import numpy as np

# Viridis at 0, 1/4, 1/2, 3/4, 1 (perceptually uniform; near = dark, far = bright).
_DEPTH_STOPS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)


def colorize_depth(depth: np.ndarray, valid: np.ndarray | None = None,
                   value_range: tuple[float, float] | None = None) -> np.ndarray:
    """uint8 RGB [H, W, 3] from depth [H, W]: viridis over `value_range` (default: the 2-98 % range of the
    valid pixels); invalid pixels (default: not finite or <= 0) are black."""
    depth = np.asarray(depth, dtype=np.float64)
    if valid is None:
        valid = np.isfinite(depth) & (depth > 0)
    image = np.zeros((*depth.shape, 3), dtype=np.uint8)
    if not valid.any():
        return image
    low, high = value_range if value_range is not None else np.percentile(depth[valid], [2, 98])
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
