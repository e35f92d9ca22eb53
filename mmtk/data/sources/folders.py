"""Folder layouts of RGB-D datasets: MultiMAE, BTS sync, sparse-to-dense, TUM, NYUv2 raw Kinect dumps, generic
(and NYUv2 .mat, detected here).

:func:`open_rgbd_source` detects the layout of a path and returns an :class:`RgbdSource` whose
``frames()`` generator streams :class:`Frame` objects in metres (one frame in memory at a time).
Files are paired by name or timestamp, never by sorted position; unpaired files are reported in
``notes`` and skipped.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Iterator

import h5py
import numpy as np

from mmtk.data.values import Percentiles, check_plausible_metres, depth_percentiles
from mmtk.data.codecs import plain
from mmtk.data.format import check_dataset_size
from mmtk.data.sources.depth_encoding import DEPTH_FORMATS, FORMAT_UNITS, DepthEncoding, decode_depth, looks_like_kinect_disparity, multiple_of_8_fraction, read_depth, read_depth_kept, read_depth_units
from mmtk.data.sources.image_files import IMAGE_SUFFIXES, read_colour, read_image, read_rgb
from mmtk.data.sources.frame import ConvertOptions, Frame, RgbdSource
from mmtk.data.sources.pairing import associate_by_time
from mmtk.data.sources.intrinsics import find_intrinsics
from mmtk.data.sources.nyuv2_meta import nyuv2_intrinsics, nyuv2_meta
from mmtk.data.sources.intrinsics import IntrinsicsFile
from mmtk.data.sources.kinect_nyu import NyuRegistration
from mmtk.data.sources.nyuv2 import NYU_MAT_NAME, nyu_mat_path, open_nyu_mat
from mmtk.errors import MmtkError

MULTIMAE_DEPTH = DepthEncoding("multimae", FORMAT_UNITS["multimae"])  # uint16: 10 m -> 65536
BTS_DEPTH = DepthEncoding("mm", FORMAT_UNITS["mm"])
TUM_DEPTH = DepthEncoding("tum", FORMAT_UNITS["tum"])
KINECT_V2_DEPTH_SIZE = (424, 512)  # (H, W) of the Kinect v2 depth image
KINECT_V2_MAX_M = 8.0  # its depth range ends here (0.5-4.5 m specified, 8 m in practice)
SUN_MULTIPLE_OF_8 = 0.9  # fraction of valid values that are multiples of 8 in a bit-rotated SUN depth PNG
TUM_MAX_DT_S = 0.02  # TUM's associate.py default
DEPTH_SUFFIXES = (".png", ".tif", ".tiff", ".npy", ".pgm")
UNREAD_FRAME_SUFFIXES = {".gif": "GIF files (256 colours of 8 bits, no 16-bit depth)"}

SUPPORTED_LAYOUTS = {
    "nyuv2-mat": f"NYUv2 labeled release: a folder with {NYU_MAT_NAME} (+ optional splits.mat)",
    "multimae": "MultiMAE prepared: {train,test}/{rgb,depth[,semseg]}/data/NNNN.png (depth uint16, 6553.6/m)",
    "bts-sync": "BTS/sync: rgb_XXXXX.jpg + sync_depth_XXXXX.png (uint16 mm)",
    "sparse-to-dense": "sparse-to-dense: *.h5 files with rgb [3,H,W] and depth [H,W] in metres",
    "tum": "TUM RGB-D: rgb/ and depth/ with timestamp names (depth 5000/m), optional associations.txt",
    "nyuv2-raw": "NYUv2 raw Kinect dumps: r-TIME-N.ppm + d-TIME-N.pgm (disparity), one scene or scene folders",
    "paired": "generic: color/depth (+label) folders with matching names, or files named *color*/*depth*",
}


def open_rgbd_source(src: str | Path, options: ConvertOptions | None = None) -> RgbdSource:
    """Detect the layout of ``src`` (or take ``options.layout``) and prepare a frame stream.

    Each layout's detector states its evidence, which the source's notes repeat. No layout, or more than
    one, raises MmtkError (the latter listing the candidates, one per line, and ``--layout``).
    """
    options = options or ConvertOptions()
    src = Path(src)
    if not src.exists():
        raise MmtkError(f"{src} does not exist")
    if options.layout is not None and options.layout not in _LAYOUTS:
        raise MmtkError(f"--layout {options.layout!r} is unknown; use one of {', '.join(_LAYOUTS)}")
    names = [options.layout] if options.layout else list(_LAYOUTS)
    found = {name: evidence for name in names if (evidence := _LAYOUTS[name][0](src))}
    if options.layout and not found:
        raise MmtkError(f"--layout {options.layout}: {src} does not hold that layout "
                        f"({SUPPORTED_LAYOUTS[options.layout]})")
    if not found:
        _refuse_unread_frames(src)
        supported = "".join(f"\n  {name}: {text}" for name, text in SUPPORTED_LAYOUTS.items())
        raise MmtkError(f"cannot tell the layout of {src}; the supported layouts, one per line:{supported}")
    if len(found) > 1:
        listing = "\n".join(f"  {name}: {evidence}" for name, evidence in found.items())
        raise MmtkError(f"{src} matches {len(found)} layouts; pick one with --layout NAME:\n{listing}")
    name, evidence = next(iter(found.items()))
    source = _LAYOUTS[name][1](src, options)
    source.notes.insert(0, f"layout evidence: {evidence}")
    if name in ("bts-sync", "sparse-to-dense", "tum") and (labels := _child(src, _LABEL_DIRS)):
        source.notes.append(f"NOT converted: labels in {labels.name}/ (the {name} layout has none; name the "
                            f"frames alike and pass --layout paired to keep them)")
    return source


def _refuse_unread_frames(src: Path) -> None:
    """Where no layout matched because the frames are in an image format mmtk does not read, say so."""
    files = src.rglob("*") if src.is_dir() else iter(())
    first = next((path for path in files if path.suffix.lower() in UNREAD_FRAME_SUFFIXES), None)
    if first is not None:
        raise MmtkError(f"{src} holds {UNREAD_FRAME_SUFFIXES[first.suffix.lower()]} (e.g. {first.relative_to(src)}), "
                        f"which mmtk does not read as frames; convert them to colour "
                        f"{'/'.join(IMAGE_SUFFIXES)} and depth {'/'.join(DEPTH_SUFFIXES)} files first")


def _checked_frames(frames: Callable[[], Iterator[Frame]], options: ConvertOptions, guessed: bool,
                    fix: str) -> Callable[[], Iterator[Frame]]:
    """``frames`` with every frame's depth checked against the sensor range when the units were not given."""
    if not guessed:
        return frames

    def checked() -> Iterator[Frame]:
        for frame in frames():
            check_plausible_metres("depth", plain(frame.arrays["depth"]), frame.frame_id, options.depth_range, fix)
            yield frame

    return checked


def _units_given(options: ConvertOptions) -> bool:
    return options.depth_scale is not None or options.depth_format is not None


def _layout_checked(frames: Callable[[], Iterator[Frame]], options: ConvertOptions,
                    encoding: DepthEncoding) -> Callable[[], Iterator[Frame]]:
    """``frames`` of a layout with its own depth units: checked against the sensor range unless the user gave
    the units."""
    return _checked_frames(frames, options, not _units_given(options),
                           _units_fix(None, encoding, "the layout's units", options))


Decodings = dict[DepthEncoding, tuple[np.ndarray, Percentiles | None]]


def _decodings(raw: np.ndarray) -> Decodings:
    """A frame's stored depth read by every named format that can read it, in metres, with its percentiles
    (computed once here, for the units guess, the refusal's hint and the first frame's check)."""
    decoded = {}
    for name in DEPTH_FORMATS:
        encoding = DepthEncoding(name, FORMAT_UNITS.get(name))
        try:
            depth = decode_depth(raw, encoding, "")
        except MmtkError:
            continue
        decoded[encoding] = (depth, depth_percentiles(depth))
    return decoded


def _units_fix(decoded: Decodings | None, encoding: DepthEncoding, how: str, options: ConvertOptions) -> str:
    """The end of a refusal: what the units were taken as, which formats (of the first frame's ``decoded``)
    would be plausible, the flags."""
    plausible = [f"{other.format} gives median {_median(reading):.2f} m" for other, reading in (decoded or {}).items()
                 if other.format != encoding.format and _plausible(reading, options.depth_range)]
    hint = f" ({'; '.join(plausible)})" if plausible else ""
    return (f"depth read as {encoding.text} ({how}); pass --depth-format {'|'.join(DEPTH_FORMATS)}{hint} or "
            f"--depth-scale UNITS_PER_METRE, or --depth-range outdoor|lidar|MIN-MAX for another sensor")


def _report_unpaired(notes: list[str], what: str, names: list[str]) -> None:
    if names:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        notes.append(f"skipped {len(names)} {what}: {shown}")


def _split_of(parts: tuple[str, ...]) -> str:
    lowered = [p.lower() for p in parts]
    if "train" in lowered:
        return "train"
    if any(p in ("test", "val", "validation") for p in lowered):
        return "test"
    return "all"


# ---------------------------------------------------------------------------------- MultiMAE
def _is_multimae(src: Path) -> str | None:
    splits = [s for s in ("train", "test", "val") if src.is_dir() and (src / s / "rgb" / "data").is_dir()]
    return f"{', '.join(f'{s}/rgb/data/' for s in splits)} folders" if splits else None


def _stems(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in {*IMAGE_SUFFIXES, *DEPTH_SUFFIXES}}


def _open_multimae(src: Path, options: ConvertOptions) -> RgbdSource:
    encoding = options.encoding(MULTIMAE_DEPTH)
    notes: list[str] = []
    plan: list[tuple[str, Path, Path, Path | None]] = []
    with_labels: set[bool] = set()
    for folder in ("train", "val", "test"):
        root = src / folder
        if not (root / "rgb" / "data").is_dir():
            continue
        split = "train" if folder == "train" else "test"
        rgb, depth = _stems(root / "rgb" / "data"), _stems(root / "depth" / "data")
        semseg = _stems(root / "semseg" / "data")
        has_semseg = (root / "semseg" / "data").is_dir()
        with_labels.add(has_semseg)
        needed = [rgb, depth] + ([semseg] if has_semseg else [])
        common = sorted(set.intersection(*(set(d) for d in needed)))
        if not common:
            raise MmtkError(f"{root}: split {folder!r} has no frame with rgb and depth"
                            f"{' and semseg' if has_semseg else ''} of the same name; the split would be empty")
        for name, files in (("rgb", rgb), ("depth", depth), ("semseg", semseg)):
            _report_unpaired(notes, f"{folder}/{name} files without all other modalities",
                             sorted(set(files) - set(common)))
        plan += [(split, rgb[s], depth[s], semseg.get(s) if has_semseg else None) for s in common]
    classes = None
    label_map = None
    if True in with_labels:
        meta = nyuv2_meta()
        if options.classes == 13:
            label_map, classes = np.asarray(meta["map40_to_13"], np.uint8), list(meta["names13"])
        elif options.classes == 40:
            classes = list(meta["names40"])
        else:
            raise MmtkError("MultiMAE's layout holds 40-class labels; use --classes 40 or 13")
        notes.append(f"semseg PNGs read as NYUv2 40-class ids (0 = unlabeled) -> {len(classes)} classes")

    def frames() -> Iterator[Frame]:
        for split, rgb_path, depth_path, label_path in plan:
            rgb = read_colour(rgb_path)
            depth = read_depth_kept(depth_path, encoding)
            semseg = None
            if label_path is not None:
                semseg = read_image(label_path)
                if semseg.ndim == 3:
                    semseg = semseg[..., 0]
                if label_map is not None:
                    if semseg.max(initial=0) >= label_map.size:
                        raise MmtkError(f"{label_path}: label {semseg.max()} is beyond the 40-class map")
                    semseg = label_map[semseg]
            arrays = {"rgb": rgb, "depth": depth} | ({"semseg": semseg} if semseg is not None else {})
            yield Frame(split, arrays, frame_id=str(rgb_path.relative_to(src)))

    frames = _layout_checked(frames, options, encoding)
    return RgbdSource("multimae", f"MultiMAE prepared layout (depth {encoding.text})", len(plan), frames,
                      classes, notes)


# ---------------------------------------------------------------------------------- BTS sync
_BTS_RGB = re.compile(r"^rgb_(\d+)\.(jpg|jpeg|png)$", re.IGNORECASE)
_BTS_DEPTH = re.compile(r"^sync_depth_(\d+)\.png$", re.IGNORECASE)


def _is_bts(src: Path) -> str | None:
    first = next(src.rglob("sync_depth_*.png"), None) if src.is_dir() else None
    return f"sync_depth_*.png files (e.g. {first.relative_to(src)})" if first else None


def _bts_key(path: Path, src: Path, number: str) -> tuple[str, str]:
    parts = [p for p in path.parent.relative_to(src).parts if p.lower() not in ("rgb", "depth")]
    return "/".join(parts), number


def _open_bts(src: Path, options: ConvertOptions) -> RgbdSource:
    encoding = options.encoding(BTS_DEPTH)
    rgb, depth = {}, {}
    for path in sorted(src.rglob("*")):
        if (m := _BTS_RGB.match(path.name)):
            rgb[_bts_key(path, src, m.group(1))] = path
        elif (m := _BTS_DEPTH.match(path.name)):
            depth[_bts_key(path, src, m.group(1))] = path
    common = sorted(set(rgb) & set(depth))
    notes: list[str] = []
    _report_unpaired(notes, "rgb files without sync_depth", [str(rgb[k].relative_to(src)) for k in sorted(set(rgb) - set(depth))])
    _report_unpaired(notes, "depth files without rgb", [str(depth[k].relative_to(src)) for k in sorted(set(depth) - set(rgb))])
    if not common:
        raise MmtkError(f"{src}: no rgb_XXXXX.jpg has a matching sync_depth_XXXXX.png")
    notes.append("intrinsics: NYUv2 RGB camera (BTS sync frames are NYUv2 raw frames registered to RGB)")

    def frames() -> Iterator[Frame]:
        for key in common:
            image = read_colour(rgb[key])
            d = read_depth_kept(depth[key], encoding)
            k = nyuv2_intrinsics() if image.shape[:2] == (480, 640) else None
            yield Frame(_split_of(rgb[key].relative_to(src).parts), {"rgb": image, "depth": d}, intrinsics=k,
                        frame_id=str(rgb[key].relative_to(src)))

    frames = _layout_checked(frames, options, encoding)
    return RgbdSource("bts-sync", f"BTS sync layout (depth {encoding.text})", len(common), frames, None, notes)


# ---------------------------------------------------------------------------------- sparse-to-dense
def _is_sparse_to_dense(src: Path) -> str | None:
    if not src.is_dir():
        return None
    first = next((p for p in sorted(src.rglob("*.h5"))), None)
    if first is None:
        return None
    evidence = f"*.h5 files with rgb and depth datasets (e.g. {first.relative_to(src)})"
    try:
        with h5py.File(first, "r") as handle:
            return evidence if "rgb" in handle and "depth" in handle and "mmtk_format" not in handle.attrs else None
    except OSError:
        return evidence  # looks like this layout; the corrupt file is reported while reading


def _open_sparse_to_dense(src: Path, options: ConvertOptions) -> RgbdSource:
    encoding = options.encoding(DepthEncoding())  # stored in metres already
    files = sorted(src.rglob("*.h5"))

    def frames() -> Iterator[Frame]:
        for path in files:
            try:
                with h5py.File(path, "r") as handle:
                    for key in ("rgb", "depth"):  # declared sizes, before memory follows them
                        check_dataset_size(handle[key], f"{path}:{key}", "re-export the file")
                    rgb, depth_units = handle["rgb"][()], handle["depth"][()]
            except (OSError, KeyError) as err:
                raise MmtkError(f"{path} is corrupt, truncated or lacks rgb/depth ({err})") from None
            if rgb.ndim == 3:
                rgb = np.ascontiguousarray(np.transpose(rgb, (1, 2, 0)))
            if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
                raise MmtkError(f"{path}: rgb is {rgb.dtype} {rgb.shape}, expected uint8 [3, H, W]")
            depth = decode_depth(depth_units, encoding, path)
            k = nyuv2_intrinsics() if rgb.shape[:2] == (480, 640) else None
            yield Frame(_split_of(path.relative_to(src).parts), {"rgb": rgb, "depth": depth}, intrinsics=k,
                        frame_id=str(path.relative_to(src)))

    notes = [f"depth read as {encoding.text}", "intrinsics: NYUv2 RGB camera for 480x640 frames, none otherwise"]
    frames = _layout_checked(frames, options, encoding)
    return RgbdSource("sparse-to-dense", "sparse-to-dense .h5 files", len(files), frames, None, notes)


# ---------------------------------------------------------------------------------- TUM
_TIMESTAMP = re.compile(r"^\d+(\.\d+)?$")
_UNIX_TIME = re.compile(r"^\d{9,}\.\d+$")  # what TUM names its frames: seconds since 1970 with a fraction
_TUM_LISTS = ("associations.txt", "rgb.txt", "depth.txt")


def _timestamped(folder: Path) -> dict[float, Path]:
    out = {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if path.suffix.lower() in IMAGE_SUFFIXES and _TIMESTAMP.match(path.stem):
            out[float(path.stem)] = path
    return out


def _is_tum(src: Path) -> str | None:
    """TUM: rgb/ and depth/ with numeric names, and either TUM's list files or Unix-time names (0000.png
    is a frame number, not a time)."""
    if not src.is_dir():
        return None
    rgb, depth = _timestamped(src / "rgb"), _timestamped(src / "depth")
    if not rgb or not depth:
        return None
    lists = [name for name in _TUM_LISTS if (src / name).is_file()]
    if lists:
        return f"rgb/ and depth/ with numeric names and {', '.join(lists)}"
    first = next(iter(rgb.values()))
    if all(_UNIX_TIME.match(p.stem) for p in (*rgb.values(), *depth.values())):
        return f"rgb/ and depth/ named by Unix time (e.g. rgb/{first.name})"
    return None


def _read_associations(path: Path, src: Path) -> list[tuple[float, Path, Path]]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields or line.startswith("#"):
            continue
        if len(fields) < 4:
            raise MmtkError(f"{path}:{number}: expected 'time rgb/file time depth/file', got {line!r}")
        first, second = src / fields[1], src / fields[3]
        rgb_path, depth_path = (first, second) if "depth" not in fields[1] else (second, first)
        try:
            stamp = float(fields[0] if rgb_path is first else fields[2])
        except ValueError:
            raise MmtkError(f"{path}:{number}: the time stamps must be numbers (seconds), got {line!r}") from None
        rows.append((stamp, rgb_path, depth_path))
    return rows


def _open_tum(src: Path, options: ConvertOptions) -> RgbdSource:
    encoding = options.encoding(TUM_DEPTH)
    notes: list[str] = []
    intrinsics = find_intrinsics(src)
    if intrinsics is not None:
        notes.append(f"intrinsics from {intrinsics.path.name}")
    assoc = src / "associations.txt"
    if assoc.is_file():
        rows = _read_associations(assoc, src)
        notes.append(f"pairs from {assoc.name}")
    else:
        rgb, depth = _timestamped(src / "rgb"), _timestamped(src / "depth")
        rgb_t, depth_t = sorted(rgb), sorted(depth)
        pairs = associate_by_time(rgb_t, depth_t, TUM_MAX_DT_S)
        rows = [(rgb_t[i], rgb[rgb_t[i]], depth[depth_t[j]]) for i, j in pairs]
        paired_rgb, paired_depth = {i for i, _ in pairs}, {j for _, j in pairs}
        notes.append(f"pairs by nearest timestamp within {TUM_MAX_DT_S * 1000:g} ms (no associations.txt)")
        _report_unpaired(notes, "rgb frames without depth", [rgb[t].name for k, t in enumerate(rgb_t) if k not in paired_rgb])
        _report_unpaired(notes, "depth frames without rgb", [depth[t].name for k, t in enumerate(depth_t) if k not in paired_depth])
    if not rows:
        raise MmtkError(f"{src}: no rgb frame has a depth frame within {TUM_MAX_DT_S * 1000:g} ms")

    def frames() -> Iterator[Frame]:
        for stamp, rgb_path, depth_path in rows:
            arrays = {"rgb": read_colour(rgb_path), "depth": read_depth_kept(depth_path, encoding)}
            yield Frame("all", arrays, _frame_intrinsics(intrinsics, arrays["rgb"]), stamp,
                        str(rgb_path.relative_to(src)))

    frames = _layout_checked(frames, options, encoding)
    return RgbdSource("tum", f"TUM RGB-D folder (depth {encoding.text})", len(rows), frames, None, notes)


# ---------------------------------------------------------------------------------- NYUv2 raw Kinect dumps
_NYU_RAW_NAME = re.compile(r"^([rd])-(\d+(?:\.\d+)?)-\d+\.(ppm|pgm)$")  # r-1294439283.377657-2857868057.ppm
NYU_RAW_DEPTH = DepthEncoding("kinect-disparity")
NYU_RAW_MAX_DT_S = 1 / 30  # one Kinect frame period: a farther colour frame shows another moment


def _nyu_raw_files(folder: Path) -> tuple[dict[float, Path], dict[float, Path]]:
    """Colour (r-*.ppm) and depth (d-*.pgm) files of one raw scene dump by their time (s, from the name)."""
    found: dict[str, dict[float, Path]] = {"r": {}, "d": {}}
    for path in sorted(folder.iterdir()):
        match = _NYU_RAW_NAME.match(path.name)
        if match and path.is_file() and (match[1], match[3]) in (("r", "ppm"), ("d", "pgm")):
            found[match[1]][float(match[2])] = path
    return found["r"], found["d"]


def _nyu_raw_scenes(src: Path) -> list[Path]:
    """``src`` itself when it is one scene dump, else its sub-folders that are."""
    if not src.is_dir():
        return []
    if all(_nyu_raw_files(src)):
        return [src]
    return [sub for sub in sorted(src.iterdir()) if sub.is_dir() and all(_nyu_raw_files(sub))]


def _is_nyu_raw(src: Path) -> str | None:
    scenes = _nyu_raw_scenes(src)
    if not scenes:
        return None
    example = next(iter(_nyu_raw_files(scenes[0])[1].values()))
    return f"{len(scenes)} raw Kinect dump(s) of r-*.ppm and d-*.pgm files (e.g. {example.relative_to(src)})"


def _nyu_raw_pairs(scene: Path, notes: list[str]) -> list[tuple[float, Path, Path]]:
    """(depth time, colour, depth) per depth frame with the nearest colour frame in time, as the NYU toolbox's
    get_synched_frames.m pairs them (a colour frame may serve two depth frames), within one frame period."""
    colour, depth = _nyu_raw_files(scene)
    colour_t = np.array(sorted(colour))
    rows, far = [], []
    for t, path in sorted(depth.items()):
        after = int(np.searchsorted(colour_t, t))
        nearest = min((colour_t[i] for i in (after - 1, after) if 0 <= i < len(colour_t)), key=lambda c: abs(c - t))
        if abs(nearest - t) <= NYU_RAW_MAX_DT_S:
            rows.append((t, colour[nearest], path))
        else:
            far.append(path.name)
    _report_unpaired(notes, f"depth frames in {scene.name}/ without a colour frame within "
                            f"{NYU_RAW_MAX_DT_S * 1000:.0f} ms", far)
    return rows


def _open_nyu_raw(src: Path, options: ConvertOptions) -> RgbdSource:
    encoding = options.encoding(NYU_RAW_DEPTH)
    if encoding.format != NYU_RAW_DEPTH.format:
        raise MmtkError(f"{src}: NYUv2 raw dumps hold raw Kinect disparity, but the depth was given as "
                        f"{encoding.text}; drop --depth-format/--depth-scale, or rename the files for --layout paired")
    notes = ["pairs: each depth frame with the nearest colour frame in time (the NYU toolbox's "
             "get_synched_frames.m); accelerometer a-*.dump files are not converted"]
    scenes = _nyu_raw_scenes(src)
    rows = [row for scene in scenes for row in _nyu_raw_pairs(scene, notes)]
    if not rows:
        raise MmtkError(f"{src}: no depth frame has a colour frame within {NYU_RAW_MAX_DT_S * 1000:.0f} ms")
    cameras = [camera for folder in dict.fromkeys([src, *scenes]) if (camera := find_intrinsics(folder))]
    register = _kinect_registration(src, cameras[0] if cameras else None, notes)

    def frames() -> Iterator[Frame]:
        for stamp, colour, depth in rows:
            arrays = register({"rgb": read_rgb(colour), "depth": read_depth(depth, encoding)}, depth.relative_to(src))
            yield Frame("all", arrays, register.calibration.rgb_matrix.astype(np.float32), stamp,
                        str(depth.relative_to(src)))

    frames = _layout_checked(frames, options, encoding)
    return RgbdSource("nyuv2-raw", f"NYUv2 raw Kinect dumps (depth {encoding.text})", len(rows), frames, None, notes)


# ---------------------------------------------------------------------------------- generic paired
_COLOR_DIRS = ("rgb", "color", "colour", "image", "images")
_DEPTH_DIRS = ("depth",)
_LABEL_DIRS = ("label", "labels", "semseg")
_COLOR_TOKEN = re.compile(r"(color|colour|rgb|images?)", re.IGNORECASE)
_DEPTH_TOKEN = re.compile(r"depth", re.IGNORECASE)
_LABEL_TOKEN = re.compile(r"(labels?|semseg)", re.IGNORECASE)
_TUM_TOKEN = re.compile(r"(?<![a-z])tum(?![a-z])", re.IGNORECASE)
_SUN_TOKEN = re.compile(r"(?<![a-z])sun(?:rgb-?d|3d)?(?![a-z])", re.IGNORECASE)  # SUN_depth, SUNRGBD, sun3d


def _child(src: Path, names: tuple[str, ...]) -> Path | None:
    for path in sorted(src.iterdir()) if src.is_dir() else []:
        if path.is_dir() and path.name.lower() in names:
            return path
    return None


def _paired_files(src: Path) -> tuple[dict[str, Path], dict[str, Path], dict[str, Path], str]:
    """Colour, depth and label files by shared key, and how they were paired (the evidence)."""
    color_dir, depth_dir = _child(src, _COLOR_DIRS), _child(src, _DEPTH_DIRS)
    if color_dir and depth_dir:
        label_dir = _child(src, _LABEL_DIRS)
        folders = f"{color_dir.name}/, {depth_dir.name}/" + (f", {label_dir.name}/" if label_dir else "")
        return (_stems(color_dir), _stems(depth_dir), _stems(label_dir) if label_dir else {},
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


def _is_paired(src: Path) -> str | None:
    if not src.is_dir():
        return None
    color, depth, _, how = _paired_files(src)
    common = sorted(set(color) & set(depth))
    return f"{how} ({len(common)} pairs, e.g. {color[common[0]].relative_to(src)})" if common else None


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
    sun_ok, mm_ok = _plausible(decoded.get(sun), depth_range), _plausible(decoded.get(mm), depth_range)
    sun_median, mm_median = (_median(decoded.get(e)) for e in (sun, mm))
    if sun_ok and mm_ok:
        raise MmtkError(f"{path}: {share}, which fits both SUN RGB-D's bit-rotated millimetres "
                        f"(median {sun_median:.2f} m) and millimetres quantised to 8 mm (median {mm_median:.2f} m); "
                        f"pass --depth-format sun or --depth-format mm")
    if mm_ok:
        return mm, (f"{share}, but SUN's bit rotation would give median {sun_median:.2f} m, outside the sensor "
                    f"range, and millimetres fit it: millimetres quantised to 8 mm")
    return sun, (f"{share} and as plain millimetres the depth would lie outside the sensor range (median "
                 f"{mm_median:.2f} m): SUN RGB-D's bit-rotated millimetres")


def _plausible(decoding: tuple[np.ndarray, Percentiles | None] | None, depth_range: tuple[float, float]) -> bool:
    """Whether one reading of a frame (depth, percentiles) passes the sensor range check."""
    if decoding is None or decoding[1] is None:
        return False
    try:
        check_plausible_metres("depth", decoding[0], "", depth_range, stats=decoding[1])
    except MmtkError:
        return False
    return True


def _median(decoding: tuple[np.ndarray, Percentiles | None] | None) -> float:
    return decoding[1][1] if decoding is not None and decoding[1] is not None else 0.0


def _frame_intrinsics(found, rgb: np.ndarray) -> np.ndarray | None:
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


def _open_paired(src: Path, options: ConvertOptions) -> RgbdSource:
    color, depth, labels, _ = _paired_files(src)
    keys = sorted(set(color) & set(depth))
    if labels:
        keys = [k for k in keys if k in labels]
        if not keys:
            raise MmtkError(f"{src}: no label file shares its name with a colour/depth pair; name each label like "
                            f"its frame (e.g. 0001.png beside 0001.jpg and 0001 depth), or move the labels away")
    notes: list[str] = []
    pairs = set(color) & set(depth)
    _report_unpaired(notes, "colour files without depth", [color[k].name for k in sorted(set(color) - set(depth))])
    _report_unpaired(notes, "depth files without colour", [depth[k].name for k in sorted(set(depth) - set(color))])
    _report_unpaired(notes, "colour/depth pairs without a label", [color[k].name for k in sorted(pairs - set(keys))])
    if labels:
        _report_unpaired(notes, "label files without colour/depth", [labels[k].name for k in sorted(set(labels) - set(keys))])
    camera = find_intrinsics(src) or find_intrinsics(depth[keys[0]].parent)
    if camera is not None:
        notes.append(f"intrinsics from {camera.path.name}")
    guessed = not _units_given(options)
    first = read_depth_units(depth[keys[0]])
    decoded = _decodings(first)
    if guessed:
        encoding, evidence = _guess_encoding(first, depth[keys[0]], src,
                                             camera.depth_units_per_metre if camera else None,
                                             camera.path.name if camera else "", decoded, options.depth_range)
        notes.append(f"{'GUESSED ' if 'declared' not in evidence else ''}depth units: {evidence}; checked against {options.depth_range[0]:g}-"
                     f"{options.depth_range[1]:g} m (pass --depth-format or --depth-scale if wrong)")
    else:
        encoding = options.encoding(DepthEncoding())
        notes.append(f"depth read as {encoding.text} (given)")
    register = _kinect_registration(src, camera, notes) if encoding.format == "kinect-disparity" else None
    fix = _units_fix(decoded, encoding, "guessed" if guessed else "given", options)
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
            intrinsics = _frame_intrinsics(camera, arrays["rgb"])
            if register is not None:
                arrays = register({name: plain(value) for name, value in arrays.items()}, color[key].relative_to(src))
                intrinsics = register.calibration.rgb_matrix.astype(np.float32)
            yield Frame("all", arrays, intrinsics, frame_id=str(color[key].relative_to(src)))

    kind = "guessed" if guessed else "given"
    return RgbdSource("paired", f"generic paired colour/depth folder (depth {encoding.text}, {kind})", len(keys),
                      _checked_frames(frames, options, guessed, fix), classes, notes)


def _kinect_registration(src: Path, camera: IntrinsicsFile | None, notes: list[str]) -> NyuRegistration:
    """The registration of raw Kinect v1 frames (NYU Depth v2 calibration), refused beside another camera file."""
    if camera is not None:
        raise MmtkError(f"{src}: raw Kinect disparity is registered to the colour image with the NYU Depth v2 "
                        f"calibration, which brings its own intrinsics, but {camera.path.name} gives others; "
                        f"move {camera.path.name} away, or convert the depth to millimetres first")
    notes.append("raw Kinect depth registered to the colour image with the NYU Depth v2 toolbox calibration "
                 "(camera_params.m): colour undistorted, each depth pixel projected into it (nearest wins, "
                 "pixels no depth reaches = 0, invalid); intrinsics: the NYUv2 RGB camera")
    return NyuRegistration()


def _label_names(src: Path, options: ConvertOptions) -> list[str]:
    names_file = src / "classes.txt"
    if names_file.is_file():
        return [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
    if options.classes == 40:
        return list(nyuv2_meta()["names40"])
    if options.classes == 13:
        return list(nyuv2_meta()["names13"])
    raise MmtkError(f"{src}: labels found but no classes.txt (one class name per line, class 1 first)")


_LAYOUTS: dict[str, tuple[Callable[[Path], str | None], Callable[[Path, ConvertOptions], RgbdSource]]] = {
    "nyuv2-mat": (lambda p: f"{p.name if p.suffix == '.mat' else NYU_MAT_NAME} found" if nyu_mat_path(p) else None,
                  open_nyu_mat),
    "multimae": (_is_multimae, _open_multimae),
    "bts-sync": (_is_bts, _open_bts),
    "sparse-to-dense": (_is_sparse_to_dense, _open_sparse_to_dense),
    "tum": (_is_tum, _open_tum),
    "nyuv2-raw": (_is_nyu_raw, _open_nyu_raw),
    "paired": (_is_paired, _open_paired),
}
