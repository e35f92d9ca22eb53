"""How stored depth values become metres: named formats, units per metre, Kinect disparity, SUN's
bit rotation; integer depth kept with its scale for lossless storage."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmtk.data.codecs import Quantized
from mmtk.data.sources.image_files import read_image
from mmtk.errors import MmtkError

DEPTH_FORMATS = {
    "m": "metres",
    "mm": "millimetres (1000 units/m)",
    "0.1mm": "0.1 mm (10000 units/m, Kinect v2 as ESANet stores it)",
    "tum": "TUM RGB-D (5000 units/m)",
    "multimae": "MultiMAE (6553.6 units/m)",
    "sun": "SUN RGB-D bit-rotated millimetres",
    "kinect-disparity": "raw Kinect v1 disparity, z = 351.3 / (1092.5 - d) m (NYU toolbox)",
}


FORMAT_UNITS = {"m": 1.0, "mm": 1000.0, "0.1mm": 10000.0, "tum": 5000.0, "multimae": 6553.6}


DEPTH_SUFFIXES = (".png", ".tif", ".tiff", ".npy", ".pgm")  # depth files the readers decode
DEPTH_RANGES = {"indoor": (0.2, 12.0), "outdoor": (0.5, 120.0), "lidar": (0.3, 250.0)}  # metres, sensor ranges


KINECT_DISPARITY_INVALID = 2047


NYU_DISPARITY_PARAMS = (351.3, 1092.5)  # NYU toolbox depth_rel2depth_abs: z = p1 / (p2 - d)


NYU_MAX_DEPTH_M = 10.0  # the toolbox's maxDepth; farther values are not measurements


@dataclass(frozen=True)
class DepthEncoding:
    """How stored depth values become metres: a named format or plain units per metre."""

    format: str | None = None  # one of DEPTH_FORMATS; None: units_per_metre
    units_per_metre: float | None = None  # None with no format: already metres

    @property
    def text(self) -> str:
        if self.format is not None:
            return DEPTH_FORMATS[self.format]
        return "metres" if self.units_per_metre is None else f"{self.units_per_metre:g} units/m"


def encoding_for(depth_format: str | None, depth_scale: float | None, default: DepthEncoding) -> DepthEncoding:
    """The encoding the user picked (--depth-format or --depth-scale), else ``default``."""
    if depth_format is not None and depth_scale is not None:
        raise MmtkError("--depth-format and --depth-scale both set the depth units; pass only one of them")
    if depth_format is not None:
        if depth_format not in DEPTH_FORMATS:
            raise MmtkError(f"--depth-format {depth_format!r} is unknown; use one of {', '.join(DEPTH_FORMATS)}")
        return DepthEncoding(depth_format, FORMAT_UNITS.get(depth_format))
    if depth_scale is not None:
        return DepthEncoding(None, depth_scale)
    return default


def parse_depth_range(text: str | None) -> tuple[float, float]:
    """--depth-range: "indoor" (default), "outdoor", "lidar" or "MIN-MAX" in metres."""
    if text is None:
        return DEPTH_RANGES["indoor"]
    if text in DEPTH_RANGES:
        return DEPTH_RANGES[text]
    parts = text.split("-")
    try:
        low, high = (float(v) for v in parts)
    except ValueError:
        low = high = -1.0
    if len(parts) != 2 or not 0 < low < high:
        raise MmtkError(f"--depth-range {text!r} is not {'|'.join(DEPTH_RANGES)} or MIN-MAX in metres (e.g. 0.3-20)")
    return low, high


def keep_depth(raw: np.ndarray, encoding: DepthEncoding, where: object) -> np.ndarray | Quantized:
    """Depth as the source holds it: unsigned integers at a plain scale stay integers with that scale (uint16's
    saturated 65535 becomes 0, the invalid marker), so the file keeps the source's precision; other depth
    becomes float32 metres (:func:`decode_depth`). Both read back as the same metres."""
    if encoding.units_per_metre is None or raw.dtype.kind != "u":
        return decode_depth(raw, encoding, where)
    return Quantized(np.where(raw == 65535, 0, raw).astype(raw.dtype) if raw.dtype == np.uint16 else raw,
                     encoding.units_per_metre)


def read_depth_kept(path: Path, encoding: DepthEncoding) -> np.ndarray | Quantized:
    """Decode a depth file to what is stored: :func:`keep_depth` of its values."""
    return keep_depth(read_depth_units(path), encoding, path)


def read_depth_units(path: Path) -> np.ndarray:
    """Decode a depth file (16-bit PNG/TIFF, float TIFF, .npy) to its stored units (not yet metres)."""
    if path.suffix.lower() == ".npy":
        try:  # mapped first: a header declaring more than the file holds fails here, before allocating
            array = np.array(np.load(path, allow_pickle=False, mmap_mode="r"))
        except (ValueError, OSError, EOFError) as err:
            raise MmtkError(f"{path} is corrupt or truncated ({err})") from None
    else:
        array = read_image(path)
    if array.ndim == 3 and array.shape[2] >= 1 and np.all(array[..., :1] == array):
        array = array[..., 0]
    if array.ndim != 2:
        raise MmtkError(f"{path}: depth image has shape {array.shape}, expected one channel")
    return array


def read_depth(path: Path, encoding: DepthEncoding) -> np.ndarray:
    """Decode a depth file to float32 metres (0 = invalid) with a known encoding."""
    return decode_depth(read_depth_units(path), encoding, path)


def decode_depth(raw: np.ndarray, encoding: DepthEncoding, where: object) -> np.ndarray:
    """Stored depth values -> float32 metres, 0 where invalid, by ``encoding``."""
    if encoding.format == "sun":
        return to_metres(unrotate_sun_depth(_uint16(raw, where, "sun")), 1000.0)
    if encoding.format == "kinect-disparity":
        return kinect_disparity_to_metres(kinect_disparity(raw, where))
    return to_metres(raw, encoding.units_per_metre)


def _uint16(raw: np.ndarray, where: object, name: str) -> np.ndarray:
    if raw.dtype != np.uint16:
        raise MmtkError(f"{where}: depth is {raw.dtype}, but --depth-format {name} is a 16-bit encoding")
    return raw


def unrotate_sun_depth(raw: np.ndarray) -> np.ndarray:
    """SUN RGB-D / SUN3D depth PNG -> millimetres: the 16 bits are rotated right by 3 (SUN RGB-D toolbox
    read3dPoints: ``bitor(bitshift(d, -3), bitshift(d, 16 - 3))``)."""
    raw = raw.astype(np.uint16, copy=False)
    return (raw >> np.uint16(3)) | (raw << np.uint16(13))


def kinect_disparity(raw: np.ndarray, where: object) -> np.ndarray:
    """Raw Kinect v1 11-bit disparity in the right byte order, or MmtkError when the values are not 11-bit.

    NYUv2's raw .pgm files declare big-endian 16-bit (the PGM rule) but hold little-endian values; the byte
    order whose values all fit 11 bits is the right one."""
    raw = _uint16(raw, where, "kinect-disparity")
    for candidate in (raw, raw.byteswap()):
        if int(candidate.max(initial=0)) <= KINECT_DISPARITY_INVALID:
            return candidate
    raise MmtkError(f"{where}: depth values reach {int(raw.max())} in both byte orders, beyond Kinect's 11-bit "
                    f"disparity (0-2047); this is not raw Kinect disparity: pass --depth-format mm or --depth-scale")


def kinect_disparity_to_metres(disparity: np.ndarray) -> np.ndarray:
    """NYU toolbox depth_rel2depth_abs: z = 351.3 / (1092.5 - d) m; 2047, negative and > 10 m are invalid (0)."""
    p1, p2 = NYU_DISPARITY_PARAMS
    d = disparity.astype(np.float32)
    with np.errstate(divide="ignore"):
        depth = np.float32(p1) / (np.float32(p2) - d)
    bad = (disparity >= KINECT_DISPARITY_INVALID) | ~(depth > 0) | (depth > NYU_MAX_DEPTH_M)
    depth[bad] = 0.0
    return depth


def looks_like_kinect_disparity(raw: np.ndarray) -> bool:
    """16-bit values within 11 bits (in one byte order) with 2047, Kinect's no-measurement code, present."""
    if raw.dtype != np.uint16:
        return False
    for candidate in (raw, raw.byteswap()):
        if int(candidate.max(initial=0)) == KINECT_DISPARITY_INVALID and (candidate > 0).mean() > 0.5:
            return True
    return False


def multiple_of_8_fraction(raw: np.ndarray) -> float:
    """Fraction of valid 16-bit values that are multiples of 8: near 1 for SUN's bit-rotated millimetres
    below 8.19 m, near 1/8 for plain millimetres."""
    valid = raw[(raw > 0) & (raw < 65535)]
    return float((valid % 8 == 0).mean()) if valid.size else 0.0


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

