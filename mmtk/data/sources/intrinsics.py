"""Camera intrinsics files beside a dataset (XML, JSON, text) parsed into K [3, 3] (pixels, 0-based)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmtk.errors import MmtkError

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


def frame_intrinsics(found: IntrinsicsFile | None, rgb: np.ndarray) -> np.ndarray | None:
    """The intrinsics file's K for this frame, refused when the file names another image size."""
    if found is None:
        return None
    if found.size is not None and found.size != rgb.shape[:2]:
        raise MmtkError(f"{found.path} is for {found.size[0]}x{found.size[1]} images but the frames are "
                        f"{rgb.shape[0]}x{rgb.shape[1]}; fix or remove the intrinsics file")
    cx, cy = float(found.matrix[0, 2]), float(found.matrix[1, 2])
    if not (0 < cx < rgb.shape[1] and 0 < cy < rgb.shape[0]):
        raise MmtkError(f"{found.path}: principal point ({cx:g}, {cy:g}) px lies outside the {rgb.shape[0]}x"
                        f"{rgb.shape[1]} frames; the file is for another image size: fix or remove it")
    return found.matrix


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

