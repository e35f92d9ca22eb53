"""What every data source yields (Frame, RgbdSource), time pairing, and image decoding with clear errors."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from mmtk.errors import MmtkError


@dataclass
class Frame:
    """One frame as a source yields it, already in mmtk units.

    ``arrays`` maps stored array names to images of one size: "rgb" uint8 [H, W, 3], "depth" float32 [H, W]
    metres (0 = invalid), optional "depth_raw" (metres), "semseg" [H, W] (0 = unlabeled), and any further
    stream a source was asked for ("ir": ...). Each name is stored by a modality adapter, which validates it
    when the frame is written. Plus intrinsics [3, 3] (pixels, 0-based), timestamp (s) and frame_id.
    """

    split: str
    arrays: dict[str, np.ndarray]
    intrinsics: np.ndarray | None = None
    timestamp: float | None = None
    frame_id: str | None = None


@dataclass
class ConvertOptions:
    """User choices that affect reading: label space and depth units."""

    classes: int = 40
    depth_scale: float | None = None  # stored units per metre; None = the layout's own


@dataclass
class RgbdSource:
    """A detected source: what it is, how many frames, class names, notes for the user, a frame stream."""

    layout: str
    description: str
    total: int
    frames: Callable[[], Iterator[Frame]]
    classes: list[str] | None = None
    notes: list[str] = field(default_factory=list)



def associate_by_time(a: list[float], b: list[float], max_dt: float) -> list[tuple[int, int]]:
    """Greedy one-to-one matching of two timestamp lists, closest pairs first, |dt| <= max_dt.

    Returns (index in a, index in b) pairs sorted by a's time.
    """
    b_sorted = np.argsort(b)
    b_times = np.asarray(b, dtype=np.float64)[b_sorted]
    candidates = []
    for i, t in enumerate(a):
        pos = int(np.searchsorted(b_times, t))
        for j in (pos - 1, pos, pos + 1):
            if 0 <= j < len(b_times) and abs(b_times[j] - t) <= max_dt:
                candidates.append((abs(b_times[j] - t), i, int(b_sorted[j])))
    used_a: set[int] = set()
    used_b: set[int] = set()
    pairs = []
    for _, i, j in sorted(candidates):
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            pairs.append((i, j))
    return sorted(pairs, key=lambda p: a[p[0]])



IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".ppm", ".bmp", ".webp")  # what the readers decode
COLOUR_MODES = ("1", "P", "PA", "LA", "RGBA", "CMYK", "YCbCr", "LAB", "HSV")  # modes PIL converts to RGB


def read_image(path: Path, to_rgb: bool = False) -> np.ndarray:
    """Decode an image file fully (PNG/JPEG/TIFF/PPM...) to a numpy array; corrupt files raise MmtkError.

    With ``to_rgb``, palette, alpha and other 8-bit colour modes are converted to RGB; label images keep their
    palette indices (the class ids)."""
    try:
        with Image.open(path) as image:
            array = np.array(image.convert("RGB") if to_rgb and image.mode in COLOUR_MODES else image)
            mode = image.mode
    except FileNotFoundError:
        raise MmtkError(f"{path} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise MmtkError(f"{path} is corrupt or truncated ({err}); re-export or remove it") from None
    if mode in ("I", "I;16B") and array.dtype != np.uint16:
        if array.min(initial=0) < 0 or array.max(initial=0) > 65535:
            raise MmtkError(f"{path}: 32-bit integer image with values beyond 16 bits; expected a uint16 depth")
        array = array.astype(np.uint16)
    return array


def read_rgb(path: Path) -> np.ndarray:
    """Decode a colour image to uint8 [H, W, 3] RGB (grey, palette, alpha and CMYK images are converted)."""
    array = read_image(path, to_rgb=True)
    if array.dtype != np.uint8:
        raise MmtkError(f"{path}: colour image has dtype {array.dtype}, expected 8-bit")
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return np.ascontiguousarray(array)


def read_depth_units(path: Path) -> np.ndarray:
    """Decode a depth file (16-bit PNG/TIFF, float TIFF, .npy) to its stored units (not yet metres)."""
    if path.suffix.lower() == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise MmtkError(f"{path} is corrupt or truncated ({err})") from None
    else:
        array = read_image(path)
    if array.ndim == 3 and array.shape[2] >= 1 and np.all(array[..., :1] == array):
        array = array[..., 0]
    if array.ndim != 2:
        raise MmtkError(f"{path}: depth image has shape {array.shape}, expected one channel")
    return array


def to_metres(raw: np.ndarray, units_per_metre: float | None) -> np.ndarray:
    """Convert stored depth to float32 metres, 0 where invalid (0, NaN, inf, saturated 65535)."""
    depth = raw.astype(np.float32)
    if raw.dtype == np.uint16:
        depth[raw == 65535] = 0.0
    depth = np.nan_to_num(depth, nan=0.0, posinf=0.0, neginf=0.0)
    if units_per_metre is not None:
        depth /= np.float32(units_per_metre)
    depth[depth < 0] = 0.0
    return depth


@lru_cache(maxsize=1)
def nyuv2_meta() -> dict[str, Any]:
    """The shipped NYUv2 metadata (splits, class maps, names, intrinsics); see mmtk/resources/nyuv2/README.md."""
    text = resources.files("mmtk").joinpath("resources/nyuv2/nyuv2_meta.json").read_text()
    return json.loads(text)


def nyuv2_intrinsics() -> np.ndarray:
    """NYUv2 RGB camera matrix for 640x480 with a 0-based principal point (toolbox cx, cy minus 1)."""
    k = nyuv2_meta()["intrinsics_rgb"]
    return np.array([[k["fx"], 0.0, k["cx"] - 1.0], [0.0, k["fy"], k["cy"] - 1.0], [0.0, 0.0, 1.0]], np.float32)
