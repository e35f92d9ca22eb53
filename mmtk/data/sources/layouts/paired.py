"""The generic paired layout: ``color/`` + ``depth/`` (+ ``label/``) folders with files of the same names, or
files named ``*color*``/``*depth*`` alike otherwise. The depth units are declared by a camera file, given, or
guessed from the first frame (the evidence is shown, and every frame is checked against the sensor range)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import numpy as np

from mmtk.data.codecs import plain
from mmtk.data.sources.depth_encoding import (DEPTH_SUFFIXES, FORMAT_UNITS, DepthEncoding, decode_depth,
                                              looks_like_kinect_disparity, multiple_of_8_fraction, read_depth_kept,
                                              read_depth_units)
from mmtk.data.sources.folders import Layout, register_layout
from mmtk.data.sources.frame import ConvertOptions, Frame, RgbdSource
from mmtk.data.sources.image_files import IMAGE_SUFFIXES, read_colour, read_image
from mmtk.data.sources.intrinsics import IntrinsicsFile, find_intrinsics, frame_intrinsics
from mmtk.data.sources.kinect_nyu import kinect_registration
from mmtk.data.sources.layouts.depth_units import (Decodings, checked_frames, decodings, reading_median,
                                                   reading_plausible, units_fix, units_given)
from mmtk.data.sources.layouts.frame_files import LABEL_DIRS, child_folder, files_by_stem, report_unpaired
from mmtk.data.sources.nyuv2_meta import nyuv2_meta
from mmtk.data.values import check_plausible_metres
from mmtk.errors import MmtkError

KINECT_V2_DEPTH_SIZE = (424, 512)  # (H, W) of the Kinect v2 depth image
KINECT_V2_MAX_M = 8.0  # its depth range ends here (0.5-4.5 m specified, 8 m in practice)
SUN_MULTIPLE_OF_8 = 0.9  # fraction of valid values that are multiples of 8 in a bit-rotated SUN depth PNG


_COLOR_DIRS = ("rgb", "color", "colour", "image", "images")
_DEPTH_DIRS = ("depth",)
_COLOR_TOKEN = re.compile(r"(color|colour|rgb|images?)", re.IGNORECASE)
_DEPTH_TOKEN = re.compile(r"depth", re.IGNORECASE)
_LABEL_TOKEN = re.compile(r"(labels?|semseg)", re.IGNORECASE)
_TUM_TOKEN = re.compile(r"(?<![a-z])tum(?![a-z])", re.IGNORECASE)
_SUN_TOKEN = re.compile(r"(?<![a-z])sun(?:rgb-?d|3d)?(?![a-z])", re.IGNORECASE)  # SUN_depth, SUNRGBD, sun3d


def _paired_files(src: Path) -> tuple[dict[str, Path], dict[str, Path], dict[str, Path], str]:
    """Colour, depth and label files by shared key, and how they were paired (the evidence)."""
    color_dir, depth_dir = child_folder(src, _COLOR_DIRS), child_folder(src, _DEPTH_DIRS)
    if color_dir and depth_dir:
        label_dir = child_folder(src, LABEL_DIRS)
        folders = f"{color_dir.name}/, {depth_dir.name}/" + (f", {label_dir.name}/" if label_dir else "")
        return (files_by_stem(color_dir), files_by_stem(depth_dir), files_by_stem(label_dir) if label_dir else {},
                f"folders {folders} with files of the same names")
    color, depth, labels = {}, {}, {}
    for path in sorted(src.rglob("*")):
        if not path.is_file():
            continue
        rel = str(path.relative_to(src).with_suffix(""))
        if path.suffix.lower() in DEPTH_SUFFIXES and _DEPTH_TOKEN.search(path.name):
            depth[_DEPTH_TOKEN.sub("*", rel)] = path
        elif path.suffix.lower() in IMAGE_SUFFIXES and _LABEL_TOKEN.search(path.name):
            labels[_LABEL_TOKEN.sub("*", rel)] = path
        elif path.suffix.lower() in IMAGE_SUFFIXES and _COLOR_TOKEN.search(path.name):
            color[_COLOR_TOKEN.sub("*", rel)] = path
    return color, depth, labels, "files named *color*/*rgb*/*image* and *depth* alike otherwise"


def _guess_encoding(raw: np.ndarray, path: Path, src: Path, camera_units: float | None,
                    camera_file: str, decoded: Decodings,
                    depth_range: tuple[float, float]) -> tuple[DepthEncoding, str]:
    """The depth encoding of a folder without declared units (``raw``: its first frame, read by each
    format in ``decoded``), and the evidence for it."""
    if camera_units is not None:
        return DepthEncoding(None, camera_units), f"{camera_units:g} units/m, declared by {camera_file}"
    if np.issubdtype(raw.dtype, np.floating):
        return DepthEncoding(), f"float depth ({raw.dtype}) read as metres"
    if path.suffix.lower() == ".pgm" and looks_like_kinect_disparity(raw):
        return (DepthEncoding("kinect-disparity"), f"{path.name}: 16-bit PGM with 11-bit values and 2047 (no "
                f"measurement) = raw Kinect v1 disparity, read with the NYU toolbox model")
    fraction = multiple_of_8_fraction(raw)
    if raw.dtype == np.uint16 and fraction >= SUN_MULTIPLE_OF_8:
        return _sun_or_millimetres(path, src, fraction, decoded, depth_range)
    if raw.dtype == np.uint16 and raw.shape == KINECT_V2_DEPTH_SIZE:
        stats = decoded[DepthEncoding("mm", FORMAT_UNITS["mm"])][1]
        if stats is not None and stats[1] > KINECT_V2_MAX_M:
            return (DepthEncoding("0.1mm", FORMAT_UNITS["0.1mm"]), f"512x424 is Kinect v2's depth size and millimetres "
                    f"would give a median of {stats[1]:.1f} m, beyond its {KINECT_V2_MAX_M:g} m range: read as 0.1 mm")
    named = next((part for part in (*path.relative_to(src).parts, src.name) if _TUM_TOKEN.search(part)), None)
    if named is not None:
        return DepthEncoding("tum", FORMAT_UNITS["tum"]), f"name {named!r} says TUM RGB-D (5000 units/m)"
    return DepthEncoding("mm", FORMAT_UNITS["mm"]), f"{raw.dtype} depth read as millimetres (the common default)"


def _sun_or_millimetres(path: Path, src: Path, fraction: float, decoded: Decodings,
                        depth_range: tuple[float, float]) -> tuple[DepthEncoding, str]:
    """Depth whose values are (nearly) all multiples of 8: SUN RGB-D's bit-rotated millimetres, or millimetres
    quantised to 8 mm? A SUN name in the path says SUN; otherwise the reading that alone lies in the sensor range
    wins, and when both do the user is asked (a wrong pick is a factor of 8)."""
    sun, mm = DepthEncoding("sun"), DepthEncoding("mm", FORMAT_UNITS["mm"])
    share = f"{100 * fraction:.0f} % of the values are multiples of 8"
    named = next((part for part in (*path.relative_to(src).parts, src.name) if _SUN_TOKEN.search(part)), None)
    if named is not None:
        return sun, f"name {named!r} says SUN RGB-D and {share}: SUN RGB-D's bit-rotated millimetres"
    sun_ok, mm_ok = reading_plausible(decoded.get(sun), depth_range), reading_plausible(decoded.get(mm), depth_range)
    sun_median, mm_median = (reading_median(decoded.get(e)) for e in (sun, mm))
    if sun_ok and mm_ok:
        raise MmtkError(f"{path}: {share}, which fits both SUN RGB-D's bit-rotated millimetres "
                        f"(median {sun_median:.2f} m) and millimetres quantised to 8 mm (median {mm_median:.2f} m); "
                        f"pass --depth-format sun or --depth-format mm")
    if mm_ok:
        return mm, (f"{share}, but SUN's bit rotation would give median {sun_median:.2f} m, outside the sensor "
                    f"range, and millimetres fit it: millimetres quantised to 8 mm")
    return sun, (f"{share} and as plain millimetres the depth would lie outside the sensor range (median "
                 f"{mm_median:.2f} m): SUN RGB-D's bit-rotated millimetres")


def _label_names(src: Path, options: ConvertOptions) -> list[str]:
    names_file = src / "classes.txt"
    if names_file.is_file():
        return [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
    if options.classes == 40:
        return list(nyuv2_meta()["names40"])
    if options.classes == 13:
        return list(nyuv2_meta()["names13"])
    raise MmtkError(f"{src}: labels found but no classes.txt (one class name per line, class 1 first)")


def _paired_keys(src: Path, color: dict[str, Path], depth: dict[str, Path], labels: dict[str, Path],
                 notes: list[str]) -> list[str]:
    """The keys of the frames to convert (colour and depth, and a label when the folder has labels); the files
    left out are listed in ``notes``."""
    pairs = set(color) & set(depth)
    keys = sorted(k for k in pairs if not labels or k in labels)
    if labels and not keys:
        raise MmtkError(f"{src}: no label file shares its name with a colour/depth pair; name each label like "
                        f"its frame (e.g. 0001.png beside 0001.jpg and 0001 depth), or move the labels away")
    report_unpaired(notes, "colour files without depth", [color[k].name for k in sorted(set(color) - set(depth))])
    report_unpaired(notes, "depth files without colour", [depth[k].name for k in sorted(set(depth) - set(color))])
    report_unpaired(notes, "colour/depth pairs without a label", [color[k].name for k in sorted(pairs - set(keys))])
    if labels:
        report_unpaired(notes, "label files without colour/depth",
                        [labels[k].name for k in sorted(set(labels) - set(keys))])
    return keys


def _folder_encoding(src: Path, path: Path, first: np.ndarray, decoded: Decodings, camera: IntrinsicsFile | None,
                     options: ConvertOptions, notes: list[str]) -> DepthEncoding:
    """The depth encoding of the folder: the user's, or guessed from its first depth file ``path`` (``first``,
    read by each format in ``decoded``), with the evidence in ``notes``."""
    if units_given(options):
        encoding = options.encoding(DepthEncoding())
        notes.append(f"depth read as {encoding.text} (given)")
        return encoding
    encoding, evidence = _guess_encoding(first, path, src, camera.depth_units_per_metre if camera else None,
                                         camera.path.name if camera else "", decoded, options.depth_range)
    notes.append(f"{'GUESSED ' if 'declared' not in evidence else ''}depth units: {evidence}; checked against "
                 f"{options.depth_range[0]:g}-{options.depth_range[1]:g} m (pass --depth-format or --depth-scale "
                 f"if wrong)")
    return encoding


@register_layout
class Paired(Layout):
    name = "paired"
    description = "generic: color/depth (+label) folders with matching names, or files named *color*/*depth*"

    def detect(self, src: Path) -> str | None:
        color, depth, _, how = _paired_files(src)
        common = sorted(set(color) & set(depth))
        return f"{how} ({len(common)} pairs, e.g. {color[common[0]].relative_to(src)})" if common else None

    def open(self, src: Path, options: ConvertOptions) -> RgbdSource:
        color, depth, labels, _ = _paired_files(src)
        notes: list[str] = []
        keys = _paired_keys(src, color, depth, labels, notes)
        camera = find_intrinsics(src) or find_intrinsics(depth[keys[0]].parent)
        if camera is not None:
            notes.append(f"intrinsics from {camera.path.name}")
        guessed = not units_given(options)
        first = read_depth_units(depth[keys[0]])
        decoded = decodings(first)
        encoding = _folder_encoding(src, depth[keys[0]], first, decoded, camera, options, notes)
        register = kinect_registration(src, camera, notes) if encoding.format == "kinect-disparity" else None
        fix = units_fix(decoded, encoding, "guessed" if guessed else "given", options)
        if guessed:
            first_m, stats = decoded.get(encoding) or (decode_depth(first, encoding, depth[keys[0]]), None)
            check_plausible_metres("depth", first_m, color[keys[0]].relative_to(src), options.depth_range, fix, stats)
        classes = None
        if labels:
            classes = _label_names(src, options)
            notes.append(f"labels read as {len(classes)}-class ids (0 = unlabeled)")

        def frames() -> Iterator[Frame]:
            for key in keys:
                arrays = {"rgb": read_colour(color[key]), "depth": read_depth_kept(depth[key], encoding)}
                if labels:
                    semseg = read_image(labels[key])
                    arrays["semseg"] = semseg[..., 0] if semseg.ndim == 3 else semseg
                intrinsics = frame_intrinsics(camera, arrays["rgb"])
                if register is not None:
                    arrays = register({name: plain(value) for name, value in arrays.items()}, color[key].relative_to(src))
                    intrinsics = register.calibration.rgb_matrix.astype(np.float32)
                yield Frame("all", arrays, intrinsics, frame_id=str(color[key].relative_to(src)))

        kind = "guessed" if guessed else "given"
        return RgbdSource("paired", f"generic paired colour/depth folder (depth {encoding.text}, {kind})", len(keys),
                          checked_frames(frames, options, guessed, fix), classes, notes)
