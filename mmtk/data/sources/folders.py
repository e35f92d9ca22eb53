"""Folder layouts of RGB-D datasets: MultiMAE, BTS sync, sparse-to-dense, TUM, generic (and NYUv2 .mat, detected here).

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

from mmtk.data.sources.base import (IMAGE_SUFFIXES, ConvertOptions, Frame, RgbdSource, associate_by_time,
                                    nyuv2_intrinsics, nyuv2_meta, read_depth_units, read_image, read_rgb, to_metres)
from mmtk.data.sources.nyuv2 import NYU_MAT_NAME, nyu_mat_path, open_nyu_mat
from mmtk.errors import MmtkError

MULTIMAE_DEPTH_SCALE = 6553.6  # uint16 units per metre: 10 m -> 65536
BTS_DEPTH_SCALE = 1000.0
TUM_DEPTH_SCALE = 5000.0
TUM_MAX_DT_S = 0.02  # TUM's associate.py default
DEPTH_SUFFIXES = (".png", ".tif", ".tiff", ".npy", ".pgm")

SUPPORTED_LAYOUTS = {
    "nyuv2-mat": f"NYUv2 labeled release: a folder with {NYU_MAT_NAME} (+ optional splits.mat)",
    "multimae": "MultiMAE prepared: {train,test}/{rgb,depth[,semseg]}/data/NNNN.png (depth uint16, 6553.6/m)",
    "bts-sync": "BTS/sync: rgb_XXXXX.jpg + sync_depth_XXXXX.png (uint16 mm)",
    "sparse-to-dense": "sparse-to-dense: *.h5 files with rgb [3,H,W] and depth [H,W] in metres",
    "tum": "TUM RGB-D: rgb/ and depth/ with timestamp names (depth 5000/m), optional associations.txt",
    "paired": "generic: color/depth (+label) folders with matching names, or files named *color*/*depth*",
}


def open_rgbd_source(src: str | Path, options: ConvertOptions | None = None) -> RgbdSource:
    """Detect the layout of ``src`` and prepare a frame stream; unknown layouts raise MmtkError."""
    options = options or ConvertOptions()
    src = Path(src)
    if not src.exists():
        raise MmtkError(f"{src} does not exist")
    for detect, build in _LAYOUTS:
        if detect(src):
            return build(src, options)
    supported = "".join(f"\n  {name}: {text}" for name, text in SUPPORTED_LAYOUTS.items())
    raise MmtkError(f"cannot tell the layout of {src}; the supported layouts, one per line:{supported}")


def _depth_scale(options: ConvertOptions, default: float) -> float:
    return options.depth_scale if options.depth_scale is not None else default


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
def _is_multimae(src: Path) -> bool:
    return src.is_dir() and any((src / split / "rgb" / "data").is_dir() for split in ("train", "test", "val"))


def _stems(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES + (".npy",)}


def _open_multimae(src: Path, options: ConvertOptions) -> RgbdSource:
    scale = _depth_scale(options, MULTIMAE_DEPTH_SCALE)
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
            rgb = read_rgb(rgb_path)
            depth = to_metres(read_depth_units(depth_path), scale)
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

    return RgbdSource("multimae", f"MultiMAE prepared layout (depth {scale:g} units/m)", len(plan), frames,
                      classes, notes)


# ---------------------------------------------------------------------------------- BTS sync
_BTS_RGB = re.compile(r"^rgb_(\d+)\.(jpg|jpeg|png)$", re.IGNORECASE)
_BTS_DEPTH = re.compile(r"^sync_depth_(\d+)\.png$", re.IGNORECASE)


def _is_bts(src: Path) -> bool:
    return src.is_dir() and next(src.rglob("sync_depth_*.png"), None) is not None


def _bts_key(path: Path, src: Path, number: str) -> tuple[str, str]:
    parts = [p for p in path.parent.relative_to(src).parts if p.lower() not in ("rgb", "depth")]
    return "/".join(parts), number


def _open_bts(src: Path, options: ConvertOptions) -> RgbdSource:
    scale = _depth_scale(options, BTS_DEPTH_SCALE)
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
            image = read_rgb(rgb[key])
            d = to_metres(read_depth_units(depth[key]), scale)
            k = nyuv2_intrinsics() if image.shape[:2] == (480, 640) else None
            yield Frame(_split_of(rgb[key].relative_to(src).parts), {"rgb": image, "depth": d}, intrinsics=k,
                        frame_id=str(rgb[key].relative_to(src)))

    return RgbdSource("bts-sync", f"BTS sync layout (depth {scale:g} units/m)", len(common), frames, None, notes)


# ---------------------------------------------------------------------------------- sparse-to-dense
def _is_sparse_to_dense(src: Path) -> bool:
    if not src.is_dir():
        return False
    first = next((p for p in sorted(src.rglob("*.h5"))), None)
    if first is None:
        return False
    try:
        with h5py.File(first, "r") as handle:
            return "rgb" in handle and "depth" in handle and "mmtk_format" not in handle.attrs
    except OSError:
        return True  # looks like this layout; the corrupt file is reported while reading


def _open_sparse_to_dense(src: Path, options: ConvertOptions) -> RgbdSource:
    scale = options.depth_scale  # stored in metres already
    files = sorted(src.rglob("*.h5"))

    def frames() -> Iterator[Frame]:
        for path in files:
            try:
                with h5py.File(path, "r") as handle:
                    rgb, depth_units = handle["rgb"][()], handle["depth"][()]
            except (OSError, KeyError) as err:
                raise MmtkError(f"{path} is corrupt, truncated or lacks rgb/depth ({err})") from None
            if rgb.ndim == 3:
                rgb = np.ascontiguousarray(np.transpose(rgb, (1, 2, 0)))
            if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
                raise MmtkError(f"{path}: rgb is {rgb.dtype} {rgb.shape}, expected uint8 [3, H, W]")
            depth = to_metres(depth_units, scale)
            k = nyuv2_intrinsics() if rgb.shape[:2] == (480, 640) else None
            yield Frame(_split_of(path.relative_to(src).parts), {"rgb": rgb, "depth": depth}, intrinsics=k,
                        frame_id=str(path.relative_to(src)))

    notes = ["depth stored in metres" + (f", divided by --depth-scale {scale:g}" if scale else ""),
             "intrinsics: NYUv2 RGB camera for 480x640 frames, none otherwise"]
    return RgbdSource("sparse-to-dense", "sparse-to-dense .h5 files", len(files), frames, None, notes)


# ---------------------------------------------------------------------------------- TUM
_TIMESTAMP = re.compile(r"^\d+(\.\d+)?$")


def _timestamped(folder: Path) -> dict[float, Path]:
    out = {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if path.suffix.lower() in IMAGE_SUFFIXES and _TIMESTAMP.match(path.stem):
            out[float(path.stem)] = path
    return out


def _is_tum(src: Path) -> bool:
    return src.is_dir() and bool(_timestamped(src / "rgb")) and bool(_timestamped(src / "depth"))


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
    scale = _depth_scale(options, TUM_DEPTH_SCALE)
    notes: list[str] = []
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
            arrays = {"rgb": read_rgb(rgb_path), "depth": to_metres(read_depth_units(depth_path), scale)}
            yield Frame("all", arrays, timestamp=stamp, frame_id=str(rgb_path.relative_to(src)))

    return RgbdSource("tum", f"TUM RGB-D folder (depth {scale:g} units/m)", len(rows), frames, None, notes)


# ---------------------------------------------------------------------------------- generic paired
_COLOR_DIRS = ("rgb", "color", "colour", "image", "images")
_DEPTH_DIRS = ("depth",)
_LABEL_DIRS = ("label", "labels", "semseg")
_COLOR_TOKEN = re.compile(r"(color|colour|rgb|image)", re.IGNORECASE)
_DEPTH_TOKEN = re.compile(r"depth", re.IGNORECASE)


def _child(src: Path, names: tuple[str, ...]) -> Path | None:
    for path in sorted(src.iterdir()) if src.is_dir() else []:
        if path.is_dir() and path.name.lower() in names:
            return path
    return None


def _paired_files(src: Path) -> tuple[dict[str, Path], dict[str, Path], dict[str, Path]]:
    color_dir, depth_dir = _child(src, _COLOR_DIRS), _child(src, _DEPTH_DIRS)
    if color_dir and depth_dir:
        label_dir = _child(src, _LABEL_DIRS)
        return _stems(color_dir), _stems(depth_dir), _stems(label_dir) if label_dir else {}
    color, depth = {}, {}
    for path in sorted(src.rglob("*")):
        if not path.is_file():
            continue
        rel = str(path.relative_to(src).with_suffix(""))
        if path.suffix.lower() in DEPTH_SUFFIXES and _DEPTH_TOKEN.search(path.name):
            depth[_DEPTH_TOKEN.sub("*", rel)] = path
        elif path.suffix.lower() in IMAGE_SUFFIXES and _COLOR_TOKEN.search(path.name):
            color[_COLOR_TOKEN.sub("*", rel)] = path
    return color, depth, {}


def _is_paired(src: Path) -> bool:
    if not src.is_dir():
        return False
    color, depth, _ = _paired_files(src)
    return bool(set(color) & set(depth))


def _guess_scale(sample: np.ndarray) -> tuple[float | None, str]:
    if np.issubdtype(sample.dtype, np.floating):
        return None, "float depth read as metres"
    return 1000.0, f"{sample.dtype} depth read as millimetres (1000 units/m)"


def _open_paired(src: Path, options: ConvertOptions) -> RgbdSource:
    color, depth, labels = _paired_files(src)
    keys = sorted(set(color) & set(depth))
    if labels:
        keys = [k for k in keys if k in labels]
        if not keys:
            raise MmtkError(f"{src}: no label file shares its name with a colour/depth pair; name each label like "
                            f"its frame (e.g. 0001.png beside 0001.jpg and 0001 depth), or move the labels away")
    notes: list[str] = []
    _report_unpaired(notes, "colour files without depth", [color[k].name for k in sorted(set(color) - set(keys))])
    _report_unpaired(notes, "depth files without colour", [depth[k].name for k in sorted(set(depth) - set(keys))])
    if labels:
        _report_unpaired(notes, "label files without colour/depth", [labels[k].name for k in sorted(set(labels) - set(keys))])
    if options.depth_scale is not None:
        scale: float | None = options.depth_scale
        notes.append(f"depth scale {scale:g} units/m (from --depth-scale)")
        guessed = False
    else:
        scale, text = _guess_scale(read_depth_units(depth[keys[0]]))
        notes.append(f"GUESSED units: {text}; check the depth range below and pass --depth-scale if wrong")
        guessed = True
    classes = None
    if labels:
        classes = _label_names(src, options)
        notes.append(f"labels read as {len(classes)}-class ids (0 = unlabeled)")

    def frames() -> Iterator[Frame]:
        for key in keys:
            arrays = {"rgb": read_rgb(color[key]), "depth": to_metres(read_depth_units(depth[key]), scale)}
            if labels:
                semseg = read_image(labels[key])
                arrays["semseg"] = semseg[..., 0] if semseg.ndim == 3 else semseg
            yield Frame("all", arrays, frame_id=str(color[key].relative_to(src)))

    kind = "guessed" if guessed else "given"
    return RgbdSource("paired", f"generic paired colour/depth folder (depth units {kind})", len(keys), frames,
                      classes, notes)


def _label_names(src: Path, options: ConvertOptions) -> list[str]:
    names_file = src / "classes.txt"
    if names_file.is_file():
        return [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
    if options.classes == 40:
        return list(nyuv2_meta()["names40"])
    if options.classes == 13:
        return list(nyuv2_meta()["names13"])
    raise MmtkError(f"{src}: labels found but no classes.txt (one class name per line, class 1 first)")


_LAYOUTS: list[tuple[Callable[[Path], bool], Callable[[Path, ConvertOptions], RgbdSource]]] = [
    (lambda p: nyu_mat_path(p) is not None, open_nyu_mat),
    (_is_multimae, _open_multimae),
    (_is_bts, _open_bts),
    (_is_sparse_to_dense, _open_sparse_to_dense),
    (_is_tum, _open_tum),
    (_is_paired, _open_paired),
]
