"""Pictures of predictions and data: colour maps of depth and labels, and the legends that give them units and
class names (prediction PNGs, evaluation panels, coloured point clouds)."""

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


LEGEND_ROW = 16  # pixels per line of legend text


def depth_bar(width: int, lo: float, hi: float, unit: str, caption: str) -> np.ndarray:
    """uint8 [32, width, 3]: the depth colour bar from ``lo`` to ``hi`` (labelled with ``unit``) and a caption."""
    from PIL import Image, ImageDraw

    strip = Image.new("RGB", (width, 2 * LEGEND_ROW), "white")
    draw = ImageDraw.Draw(strip)
    low_text, high_text = f"{lo:.2f} {unit}".strip(), f"{hi:.2f} {unit}".strip()
    left, right = 6 * len(low_text) + 8, width - 6 * len(high_text) - 8
    ramp = np.tile(np.linspace(lo, hi, max(right - left, 2)), (10, 1))
    strip.paste(Image.fromarray(colorize_depth(ramp, np.ones(ramp.shape, bool), (lo, hi))), (left, 2))
    draw.text((2, 1), low_text, fill="black")
    draw.text((right + 4, 1), high_text, fill="black")
    draw.text((2, LEGEND_ROW + 1), caption + "; black: no value", fill="black")
    return np.asarray(strip)


def class_legend(width: int, palette: np.ndarray, classes: list[int], names: tuple[str, ...] | list[str] = ()
                 ) -> np.ndarray:
    """uint8 [rows x 16, width, 3]: a swatch and a name for each class in ``classes`` (0-based; palette row k + 1)."""
    from PIL import Image, ImageDraw

    columns = max(1, width // 110)
    rows = max(1, -(-len(classes) // columns))
    strip = Image.new("RGB", (width, rows * LEGEND_ROW + 2), "white")
    draw = ImageDraw.Draw(strip)
    for i, k in enumerate(classes):
        x, y = 4 + (i % columns) * 110, 2 + (i // columns) * LEGEND_ROW
        draw.rectangle([x, y, x + 10, y + 10], fill=tuple(int(v) for v in palette[k + 1]))
        draw.text((x + 14, y), (names[k] if k < len(names) else f"class {k}")[:15], fill="black")
    if not classes:
        draw.text((4, 2), "no class predicted", fill="black")
    return np.asarray(strip)


def value_picture(values: np.ndarray, valid: np.ndarray, unit: str, caption: str) -> np.ndarray:
    """uint8 [H + 32, W, 3]: a per-pixel value map (viridis over its 2-98 % range) above its colour bar in ``unit``."""
    lo, hi = np.percentile(values[valid], [2, 98]) if valid.any() else (0.0, 1.0)
    picture = colorize_depth(values, valid, (float(lo), float(hi)))
    return np.concatenate([picture, depth_bar(picture.shape[1], float(lo), float(hi), unit, caption)])


def label_picture(labels: np.ndarray, palette: np.ndarray, names: tuple[str, ...] | list[str] = ()) -> np.ndarray:
    """uint8 [H + legend, W, 3]: labels [H, W] (0 = unlabeled, k = class k - 1) in ``palette``'s colours above a
    legend of the classes present."""
    present = [int(k) - 1 for k in np.unique(labels) if k > 0]
    return np.concatenate([palette[labels], class_legend(labels.shape[1], palette, present, names)])
