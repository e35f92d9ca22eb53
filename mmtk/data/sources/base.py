"""What every data source yields (Frame, RgbdSource), time pairing, and image decoding with clear errors."""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from mmtk.data.codecs import Encoded, FrameArray, Quantized
from mmtk.errors import MmtkError


@dataclass
class Frame:
    """One frame as a source yields it, in mmtk units or as the source got it.

    ``arrays`` maps stored array names to images of one size: "rgb" uint8 [H, W, 3], "depth" float32 [H, W]
    metres (0 = invalid), optional "depth_raw" (metres), "semseg" [H, W] (0 = unlabeled), and any further
    stream a source was asked for ("ir": ...). Each name is stored by a modality adapter, which validates it
    when the frame is written. Plus intrinsics [3, 3] (pixels, 0-based), timestamp (s) and frame_id.
    A source hands over what it got, so the file keeps it losslessly: colour a file or message holds as JPEG as
    :class:`~mmtk.data.codecs.Encoded` bytes (:func:`read_colour`), depth a file holds as integers with a scale
    as :class:`~mmtk.data.codecs.Quantized` (:func:`keep_depth`); ``mmtk.data.codecs.plain`` gives the numbers.
    """

    split: str
    arrays: dict[str, FrameArray]
    intrinsics: np.ndarray | None = None
    timestamp: float | None = None
    frame_id: str | None = None


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


@dataclass
class ConvertOptions:
    """User choices that affect reading: label space, depth units, plausible depth range, layout."""

    classes: int = 40
    depth_scale: float | None = None  # stored units per metre; None = the layout's own
    depth_format: str | None = None  # a DEPTH_FORMATS name; None = the layout's own
    depth_range: tuple[float, float] = DEPTH_RANGES["indoor"]  # metres, checked where units are guessed
    layout: str | None = None  # a layout name; None = detect

    def encoding(self, default: DepthEncoding) -> DepthEncoding:
        """The depth encoding to read with: the user's choice, else the layout's ``default``."""
        return encoding_for(self.depth_format, self.depth_scale, default)


@dataclass
class RgbdSource:
    """A detected source: what it is, how many frames (at most), class names, notes for the user, a frame stream,
    and what to tell the user once ``n`` frames were written (sources that learn it while streaming)."""

    layout: str
    description: str
    total: int
    frames: Callable[[], Iterator[Frame]]
    classes: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    summary: Callable[[int], str] | None = None
    decode_apart: bool = True  # decode in a second process (convert.read_ahead); False where moving a frame
    # between processes costs more than decoding it (NYUv2's .mat: 4 MB a frame, read without decoding)


def associate_by_time(a: list[float], b: list[float], max_dt: float, a_order: list[float] | None = None,
                      b_order: list[float] | None = None) -> list[tuple[int, int]]:
    """Greedy one-to-one matching of two timestamp lists, closest pairs first, |dt| <= max_dt.

    Every b within max_dt of an a is a candidate, so repeated stamps all find partners. Equally close pairs
    (repeated stamps) go first to the pair closest in ``a_order``/``b_order`` (e.g. the times a recorder logged
    the messages), then in list order. Returns (index in a, index in b) pairs sorted by a's time.
    """
    b_sorted = np.argsort(b, kind="stable")
    b_times = np.asarray(b, dtype=np.float64)[b_sorted]
    candidates = []
    for i, t in enumerate(a):
        low, high = int(np.searchsorted(b_times, t - max_dt)), int(np.searchsorted(b_times, t + max_dt, "right"))
        for pos in range(max(0, low - 1), min(len(b_times), high + 1)):  # +-1: float rounding at the edges
            j = int(b_sorted[pos])
            if abs(b_times[pos] - t) <= max_dt:
                tie = abs(a_order[i] - b_order[j]) if a_order is not None and b_order is not None else 0.0
                candidates.append((abs(b_times[pos] - t), tie, i, j))
    used_a: set[int] = set()
    used_b: set[int] = set()
    pairs = []
    for _, _, i, j in sorted(candidates):
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            pairs.append((i, j))
    return sorted(pairs, key=lambda p: a[p[0]])



IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".ppm", ".bmp", ".webp")  # what the readers decode
COLOUR_MODES = ("1", "P", "PA", "LA", "RGBA", "CMYK", "YCbCr", "LAB", "HSV")  # modes PIL converts to RGB
MAX_IMAGE_PIXELS = 8192 * 8192  # far above any RGB-D camera, far below a decompression bomb (PIL warns at 89 Mpx)


def read_image(path: Path, to_rgb: bool = False) -> np.ndarray:
    """Decode an image file fully (PNG/JPEG/TIFF/PPM...) to a numpy array; corrupt files raise MmtkError.

    With ``to_rgb``, palette, alpha and other 8-bit colour modes are converted to RGB; label images keep their
    palette indices (the class ids)."""
    try:
        with Image.open(path) as image:
            check_image_size(image, path)
            array = np.array(image.convert("RGB") if to_rgb and image.mode in COLOUR_MODES else image)
            mode = image.mode
    except FileNotFoundError:
        raise MmtkError(f"{path} does not exist") from None
    except Image.DecompressionBombError as err:
        raise MmtkError(f"{path}: {err}; refused before decoding (a corrupt or hostile file)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise MmtkError(f"{path} is corrupt or truncated ({err}); re-export or remove it") from None
    if mode in ("I", "I;16B") and array.dtype != np.uint16:
        if array.min(initial=0) < 0 or array.max(initial=0) > 65535:
            raise MmtkError(f"{path}: 32-bit integer image with values beyond 16 bits; expected a uint16 depth")
        array = array.astype(np.uint16)
    return array


def check_image_size(image: Image.Image, name: object) -> None:
    """Refuse an image whose header declares more than :data:`MAX_IMAGE_PIXELS`, before it is decoded."""
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise MmtkError(f"{name}: the image header declares {width}x{height} px ({width * height / 1e6:.0f} Mpx), over "
                        f"the {MAX_IMAGE_PIXELS / 1e6:.0f} Mpx limit; refused before decoding (a corrupt or hostile "
                        f"file, or resize it first)")


def read_rgb(path: Path) -> np.ndarray:
    """Decode a colour image to uint8 [H, W, 3] RGB (grey, palette, alpha and CMYK images are converted)."""
    array = read_image(path, to_rgb=True)
    if array.dtype != np.uint8:
        raise MmtkError(f"{path}: colour image has dtype {array.dtype}, expected 8-bit")
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return np.ascontiguousarray(array)


def read_colour(path: Path) -> np.ndarray | Encoded:
    """A colour file as it is to be stored: a JPEG of 8-bit RGB as its own bytes (decoded, and so checked, when
    written), any other image decoded to uint8 RGB (:func:`read_rgb`)."""
    try:
        data = path.read_bytes()
    except OSError:
        return read_rgb(path)  # which says what is wrong with the file
    return encoded_colour(data, path) or read_rgb(path)


def encoded_colour(data: bytes, name: object) -> Encoded | None:
    """``data`` as :class:`Encoded` when it is a whole JPEG of 8-bit RGB (decoded once by Pillow to check), else
    None."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "JPEG" or image.mode != "RGB":
                return None
            check_image_size(image, name)
            image.load()  # a complete decode, which refuses a truncated file (libjpeg-turbo alone fills it in)
            return Encoded(data, "jpeg", (image.height, image.width, 3))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return None  # not a whole JPEG: the decoder that follows names the problem


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


@lru_cache(maxsize=1)
def nyuv2_meta() -> dict[str, Any]:
    """The shipped NYUv2 metadata (splits, class maps, names, intrinsics); see mmtk/resources/nyuv2/README.md."""
    text = resources.files("mmtk").joinpath("resources/nyuv2/nyuv2_meta.json").read_text()
    return json.loads(text)


def nyuv2_intrinsics() -> np.ndarray:
    """NYUv2 RGB camera matrix for 640x480 with a 0-based principal point (toolbox cx, cy minus 1)."""
    k = nyuv2_meta()["intrinsics_rgb"]
    return np.array([[k["fx"], 0.0, k["cx"] - 1.0], [0.0, k["fy"], k["cy"] - 1.0], [0.0, 0.0, 1.0]], np.float32)


INTRINSICS_NAME = re.compile(r"(intrinsic|camera|calib|cam_in)", re.IGNORECASE)
INTRINSICS_SUFFIXES = (".xml", ".json", ".txt")
MAX_INTRINSICS_BYTES = 1 << 20


@dataclass
class IntrinsicsFile:
    """A camera file read next to frames: K (pixels, as the file gives it) and what else it says."""

    path: Path
    matrix: np.ndarray
    size: tuple[int, int] | None = None  # (H, W) the matrix is for, when the file says
    depth_units_per_metre: float | None = None  # PCL's z_multiplication_factor, inverted


def find_intrinsics(folder: Path) -> IntrinsicsFile | None:
    """The intrinsics file in ``folder`` (name with intrinsic/camera/calib; PCL XML, JSON or text), if any.

    Several files with different matrices are refused: which one belongs to the frames is not known."""
    found: list[IntrinsicsFile] = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if path.is_file() and path.suffix.lower() in INTRINSICS_SUFFIXES and INTRINSICS_NAME.search(path.name):
            found.append(read_intrinsics_file(path))
    if not found:
        return None
    if any(not np.allclose(f.matrix, found[0].matrix) for f in found[1:]):
        raise MmtkError(f"{folder}: intrinsics files disagree ({', '.join(f.path.name for f in found)}); "
                        f"keep the one that belongs to the frames")
    return found[0]


def read_intrinsics_file(path: Path) -> IntrinsicsFile:
    """K from a PCL grabber XML (<rgb><focal_length_x>...), a JSON camera file or a text file."""
    if path.stat().st_size > MAX_INTRINSICS_BYTES:
        raise MmtkError(f"{path}: {path.stat().st_size} bytes is too large for an intrinsics file")
    text = path.read_text(errors="replace")
    reader = {".xml": _intrinsics_xml, ".json": _intrinsics_json}.get(path.suffix.lower(), _intrinsics_txt)
    try:
        found = reader(text, path)
    except (ValueError, KeyError, TypeError, IndexError) as err:
        raise MmtkError(f"{path}: cannot read intrinsics ({err}); fix or remove the file") from None
    if found.matrix[0, 0] <= 0 or found.matrix[1, 1] <= 0 or not np.all(np.isfinite(found.matrix)):
        raise MmtkError(f"{path}: intrinsics {found.matrix.tolist()} need positive, finite focal lengths")
    return found


def _k(fx: object, fy: object, cx: object, cy: object) -> np.ndarray:
    from mmtk.pointcloud import intrinsics_matrix

    return intrinsics_matrix(float(fx), float(fy), float(cx), float(cy))  # type: ignore[arg-type]


def _intrinsics_xml(text: str, path: Path) -> IntrinsicsFile:
    """PCL's grabber XML: <rgb> and <depth> elements (two roots, so wrapped) with focal_length_x/y and
    principal_point_x/y; <depth> may give z_multiplication_factor (metres per unit)."""
    import xml.etree.ElementTree as ET

    body = re.sub(r"^\s*<\?xml[^>]*\?>", "", text)
    if "<!DOCTYPE" in body or "<!ENTITY" in body:
        raise ValueError("DTDs and entities are not read")
    root = ET.fromstring(f"<root>{body}</root>")
    camera = root.find("rgb") if root.find("rgb") is not None else root.find("depth")
    if camera is None:
        raise ValueError("no <rgb> or <depth> element")

    def value(element: ET.Element, tag: str) -> float:
        node = element.find(tag)
        if node is None or node.text is None:
            raise KeyError(tag)
        return float(node.text)

    k = _k(value(camera, "focal_length_x"), value(camera, "focal_length_y"), value(camera, "principal_point_x"),
           value(camera, "principal_point_y"))
    depth = root.find("depth")
    factor = depth.find("z_multiplication_factor") if depth is not None else None
    units = 1.0 / float(factor.text) if factor is not None and factor.text and float(factor.text) > 0 else None
    return IntrinsicsFile(path, k, None, units)


def _intrinsics_json(text: str, path: Path) -> IntrinsicsFile:
    """JSON: Open3D's {"width", "height", "intrinsic_matrix": 9 values column-major}, {"fx", "fy", "cx",
    "cy"} (at the top or under "intrinsics"/"color"/"rgb"), {"K" or "camera_matrix": 3x3} or {"cam_in":
    [fx, fy, cx, cy]}."""
    data = json.loads(text)
    for key in ("intrinsics", "color", "rgb"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object")
    size = (int(data["height"]), int(data["width"])) if "height" in data and "width" in data else None
    if "intrinsic_matrix" in data:
        k = np.asarray(data["intrinsic_matrix"], np.float32).reshape(3, 3).T  # Open3D stores it column-major
    elif all(key in data for key in ("fx", "fy", "cx", "cy")):
        k = _k(data["fx"], data["fy"], data["cx"], data["cy"])
    elif "K" in data or "camera_matrix" in data:
        k = np.asarray(data.get("K", data.get("camera_matrix")), np.float32).reshape(3, 3)
    elif "cam_in" in data:
        k = _k(*data["cam_in"][:4])
    else:
        raise KeyError("no intrinsic_matrix, fx/fy/cx/cy, K, camera_matrix or cam_in")
    return IntrinsicsFile(path, k, size)


def _intrinsics_txt(text: str, path: Path) -> IntrinsicsFile:
    """Text: "fx fy cx cy [distortion...]" on the first line of numbers (TUM/DVO style), or a 3x3 matrix."""
    rows = [line.replace(",", " ").split() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
    numbers = [[float(v) for v in row] for row in rows]
    if len(numbers) >= 3 and all(len(row) == 3 for row in numbers[:3]):
        return IntrinsicsFile(path, np.asarray(numbers[:3], np.float32))
    if numbers and len(numbers[0]) >= 4:
        return IntrinsicsFile(path, _k(*numbers[0][:4]))
    raise ValueError("expected 'fx fy cx cy' or a 3x3 matrix")
